"""Verbs on the image store: load, save, import, images, inspect, history, tag,
rmi, prune, df, mount, unmount, fsck.

Every verb takes ``--root DIR`` and ``--driver NAME``, before the verb (the
``layerfs`` group's options) or after it.  The store is opened on first use.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import threading
import time
from typing import List, Optional

import click

from . import EXIT_DIFFERENT, cli
from ._output import emit_json, human_size, progress_enabled
from ._root import check_new_root

# --------------------------------------------------------------------------- store access


def _open_store(ctx: click.Context, root: Optional[str], driver: Optional[str]):
    from ..store import Store
    obj = ctx.find_object(dict) or {}
    if "store" not in obj:
        driver = driver or obj.get("driver")
        if driver is not None:
            # a new store records its driver before the driver is loaded: a name
            # no driver has would be remembered, and refuse every later command
            from .. import drivers
            if driver not in drivers.names():
                raise click.BadParameter(f"unknown storage driver {driver!r} (known: "
                                         f"{', '.join(drivers.names())})", param_hint="'--driver'")
        root = root or obj.get("root")
        if root:
            check_new_root(root)
        store = Store(root, driver)
        obj["store"] = store
        ctx.find_root().call_on_close(store.close)
    return obj["store"]


def store_options(f):
    """Add --root/--driver after the verb; the command gets a store opener first."""
    @click.option("--root", "root_", type=click.Path(file_okay=False), default=None,
                  help="Image store directory (also accepted before the verb).")
    @click.option("--driver", "driver_", default=None,
                  help="Storage driver of the store (also accepted before the verb).")
    @click.pass_context
    @functools.wraps(f)
    def wrapper(ctx, root_, driver_, **kw):
        return f(lambda: _open_store(ctx, root_, driver_), **kw)
    return wrapper


def _quiet_option(f):
    return click.option("-q", "--quiet", is_flag=True,
                        help="No progress on stderr (it shows only on a terminal anyway).")(f)


def _json_option(f):
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON document on stdout.")(f)


# --------------------------------------------------------------------------- progress

class _RichProgress:
    """Store progress rendered by rich on stderr: one line per layer, bytes and rate."""

    enabled = True

    def __init__(self):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TransferSpeedColumn)
        self._p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeElapsedColumn(),
                           console=Console(stderr=True), transient=False)
        self._lock = threading.Lock()

    def __enter__(self):
        self._p.start()
        return self

    def __exit__(self, *exc):
        self._p.stop()

    def task(self, description: str, total: Optional[int]):
        p = self._p
        tid = p.add_task(description, total=total)

        class _T:
            def update(self, completed: int) -> None:
                p.update(tid, completed=completed)

            def done(self, note: str = "") -> None:
                t = p.tasks[[x.id for x in p.tasks].index(tid)]
                p.update(tid, completed=t.total if t.total is not None else t.completed)
                p.stop_task(tid)
        return _T()

    def message(self, text: str) -> None:
        self._p.console.print(text)


class _NoProgress:
    enabled = False

    def __enter__(self):
        from ..store.progress import NULL
        return NULL

    def __exit__(self, *exc):
        pass


def _progress(quiet: bool):
    return _RichProgress() if progress_enabled(quiet) else _NoProgress()


# --------------------------------------------------------------------------- formatting

def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _ago(created: Optional[str]) -> str:
    if not created:
        return "N/A"
    try:
        text = created.replace("Z", "+00:00")
        if "." in text:                              # Go writes up to 9 fraction digits
            head, rest = text.split(".", 1)
            frac = "".join(c for c in rest if c.isdigit())
            tz = rest[len(frac):]
            text = f"{head}.{frac[:6]}{tz}"
        t = datetime.datetime.fromisoformat(text)
    except ValueError:
        return created
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    secs = (datetime.datetime.now(datetime.timezone.utc) - t).total_seconds()
    for unit, n in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400),
                    ("day", 86400), ("hour", 3600), ("minute", 60)):
        if secs >= n:
            k = int(secs // n)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "just now" if secs >= 0 else created


def _check_seekable(source: str, why: str) -> None:
    """The library's refusal of a pipe as input, before the store is made."""
    from ..images._io import refuse_unseekable
    from ..images.sources import parse_source
    try:
        path = parse_source(source)[1]
    except ValueError:
        return                      # the command reports it
    refuse_unseekable(path, why)


def _split_name(name: str):
    from ..images.reference import parse
    r = parse(name)
    repo = r.familiar().split("@")[0]
    if r.tag:
        repo = repo[:-(len(r.tag) + 1)]
    return repo, r.tag or "<none>"


def _table(rows: List[List[str]], headers: List[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    click.echo("   ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in rows:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# --------------------------------------------------------------------------- load / import / save

@cli.command("load")
@click.option("-i", "--input", "source", required=True,
              help="OCI layout or docker-archive: directory or tarball (plain, gzip, zstd), "
                   "or oci:PATH[:TAG], oci-archive:PATH[:TAG], docker-archive:PATH[:REF].")
@click.option("--platform", default=None, help="os/arch[/variant] to take from an image index "
                                               "(default: this machine's).")
@click.option("--name", "base_name", default=None,
              help="Repository for bare OCI tags (ref.name \"1.0\" becomes NAME:1.0).")
@click.option("-t", "--tag", "tags", multiple=True,
              help="Name the loaded image (instead of the names the source gives).")
@_quiet_option
@_json_option
@store_options
def load_cmd(store, source, platform, base_name, tags, quiet, as_json):
    """Load the images of an OCI layout or docker-archive into the store."""
    _check_seekable(source, "an image tarball is read with seeks")
    s = store()
    with _progress(quiet) as prog:
        res = s.load(source, platform=platform, base_name=base_name,
                     names=list(tags) if tags else None, progress=prog)
    if as_json:
        emit_json({"version": 1, "images": [r.to_json() for r in res]})
        return 0
    for r in res:
        what = ", ".join(r.names) if r.names else f"ID: {r.image.id}"
        note = f" (untagged; the source's tags: {', '.join(r.tags)}; use --name REPO)" \
            if not r.names and r.tags else ""
        click.echo(f"Loaded image: {what}{note}")
        if not quiet:
            click.echo(f"  {r.new_layers} new layer(s), {r.reused_layers} already stored, "
                       f"{human_size(r.bytes_written)} of blobs written", err=True)
    return 0


@cli.command("import")
@click.argument("tarball", type=click.Path(exists=True, dir_okay=False))
@click.argument("ref", required=False)
@click.option("-m", "--message", default=None, help="History comment.")
@click.option("--platform", default=None, help="os/arch[/variant] of the image "
                                               "(default: this machine's).")
@_quiet_option
@_json_option
@store_options
def import_cmd(store, tarball, ref, message, platform, quiet, as_json):
    """Make a one-layer image of a root filesystem tarball (like docker import)."""
    _check_seekable(tarball, "a rootfs tarball is read twice")
    s = store()
    with _progress(quiet) as prog:
        r = s.import_rootfs(tarball, ref, message=message, platform=platform, progress=prog)
    if as_json:
        emit_json({"version": 1, **r.to_json()})
        return 0
    click.echo(r.image.id)
    return 0


@cli.command("save")
@click.argument("refs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Tarball to write (a directory for --format oci-dir).")
@click.option("--format", "fmt", type=click.Choice(["oci", "oci-dir", "docker-archive"]),
              default="oci", show_default=True)
@click.option("--allow-recompress", is_flag=True,
              help="When blobs were pruned, compress the layers again (new layer and "
                   "manifest digests) instead of refusing.")
@_quiet_option
@_json_option
@store_options
def save_cmd(store, refs, output, fmt, allow_recompress, quiet, as_json):
    """Write images to an OCI layout or a docker-archive, with their original digests."""
    if fmt != "oci-dir":
        # the tarball is written beside itself and renamed into place: without
        # this, a missing directory was reported under the temporary file's name
        parent = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(parent):
            from ..errors import NotFound
            what = "is not a directory" if os.path.lexists(parent) else "does not exist"
            raise NotFound(f"cannot write the tarball: {parent} {what}", output)
    s = store()
    try:
        with _progress(quiet) as prog:
            res = s.save(list(refs), output, fmt, allow_recompress=allow_recompress,
                         progress=prog)
    except OSError as e:
        if not e.filename:          # a write that failed (a full disk) names no file
            e.filename = output
        raise
    for img in res.images:
        if img.manifest_digest != img.written_manifest_digest:
            click.echo(f"layerfs: note: image {_short(img.id)}: {img.recompressed_layers} layer "
                       f"blob(s) compressed again (their originals were pruned): the manifest "
                       f"is now {img.written_manifest_digest}, not {img.manifest_digest}; "
                       "signatures over the original manifest do not apply", err=True)
    if as_json:
        emit_json({"version": 1, **res.to_json()})
    return 0


# --------------------------------------------------------------------------- listing

@cli.command("images")
@click.option("--digests", is_flag=True, help="Show manifest digests.")
@click.option("--no-trunc", is_flag=True, help="Full image ids.")
@_json_option
@store_options
def images_cmd(store, digests, no_trunc, as_json):
    """List images: names, id, size, and how much of it is shared with other images."""
    d = store().df()
    if as_json:
        emit_json({"version": 1, "images": d["images"]})
        return 0
    rows = []
    for img in sorted(d["images"], key=lambda i: i["created"] or "", reverse=True):
        ident = img["id"] if no_trunc else _short(img["id"])
        names = img["names"] or [None]
        for n in names:
            repo, tag = _split_name(n) if n else ("<none>", "<none>")
            row = [repo, tag]
            if digests:
                row.append(img["manifest_digest"])
            row += [ident, _ago(img["created"]), human_size(img["size"]),
                    human_size(img["shared_size"]), human_size(img["unique_size"]),
                    human_size(img["blobs_size"])]
            rows.append(row)
    headers = ["REPOSITORY", "TAG"] + (["DIGEST"] if digests else []) + \
        ["IMAGE ID", "CREATED", "SIZE", "SHARED SIZE", "UNIQUE SIZE", "BLOBS"]
    _table(rows, headers)
    return 0


@cli.command("df")
@click.option("-v", "--verbose", is_flag=True, help="Every image and layer.")
@_json_option
@store_options
def df_cmd(store, verbose, as_json):
    """Disk usage of the store: layers (shared and unique per image) and blobs."""
    d = store().df()
    if as_json:
        emit_json({"version": 1, **d})
        return 0
    t = d["totals"]
    click.echo(f"Store {d['root']} (driver {d['driver']}): {human_size(t['store_size'])} on disk")
    untagged_unique = sum(i["unique_size"] for i in d["images"] if not i["names"])
    _table([
        ["Images", str(t["images"]), human_size(t["layers_size"] - t["layers_unreferenced_size"]),
         human_size(untagged_unique)],
        ["Layers", str(t["layers"]), human_size(t["layers_size"]),
         human_size(t["layers_unreferenced_size"])],
        ["Blobs", str(t["blobs"]), human_size(t["blobs_size"]),
         human_size(t["blobs_unreferenced_size"] + t["blobs_regenerable_size"])],
    ], ["TYPE", "COUNT", "SIZE", "RECLAIMABLE"])
    click.echo(f"(blobs: {human_size(t['blobs_regenerable_size'])} regenerable from tar-split "
               f"records -- `prune --blobs`; {human_size(t['blobs_unreferenced_size'])} "
               "unreferenced -- `prune`)")
    if verbose:
        click.echo("\nImages:")
        rows = []
        for img in d["images"]:
            rows.append([", ".join(img["names"]) or "<none>", _short(img["id"]),
                         str(img["layers"]), human_size(img["size"]),
                         human_size(img["shared_size"]), human_size(img["unique_size"]),
                         human_size(img["blobs_size"]), str(img["mounted"])])
        _table(rows, ["NAMES", "IMAGE ID", "LAYERS", "SIZE", "SHARED SIZE", "UNIQUE SIZE",
                      "BLOBS", "MOUNTS"])
        click.echo("\nLayers:")
        _table([[_short(l["chain_id"]), _short(l["diff_id"]), human_size(l["size"]),
                 human_size(l["tar_size"]), str(l["images"]), "yes" if l["record"] else "no"]
                for l in d["layers"]],
               ["CHAIN ID", "DIFF ID", "SIZE", "TAR SIZE", "IMAGES", "RECORD"])
    return 0


@cli.command("inspect")
@click.argument("refs", nargs=-1, required=True)
@store_options
def inspect_cmd(store, refs):
    """Show images as JSON: names, ids, manifest, config, layers (with ChainIDs)."""
    s = store()
    out = []
    with s.reading():
        for ref in refs:
            img = s.resolve(ref).image
            config = json.loads(s.read_blob(img.config_digest))
            manifest = json.loads(s.read_blob(img.manifest_digest))
            layers = []
            for l in img.layers:
                rec = s.layer(l.chain_id)
                layers.append({**l.to_json(), "blob_present": s.has_blob(l.digest),
                               "tar_size": rec.tar_size if rec else None,
                               "record": bool(rec and rec.record)})
            out.append({
                "Id": img.id, "RepoTags": s.names_of(img.manifest_digest),
                "ManifestDigest": img.manifest_digest, "ManifestMediaType":
                img.manifest_media_type, "Created": img.created, "Platform": img.platform,
                "Mounted": s.mounted_path(img), "Source": img.source,
                "Layers": layers, "Manifest": manifest, "Config": config})
    emit_json(out, width=100)                # read by eye, as docker inspect
    return 0


@cli.command("history")
@click.argument("ref")
@click.option("--no-trunc", is_flag=True, help="Do not shorten CREATED BY.")
@_json_option
@store_options
def history_cmd(store, ref, no_trunc, as_json):
    """Show the history of an image (newest first), with each layer's size."""
    s = store()
    with s.reading():
        img = s.resolve(ref).image
        config = json.loads(s.read_blob(img.config_digest))
        layers = list(img.layers)
        sizes = [(s.layer(l.chain_id).tar_size if s.layer(l.chain_id) else 0) for l in layers]
    entries = []
    li = 0
    for h in config.get("history") or []:
        empty = bool(h.get("empty_layer"))
        layer = None if empty or li >= len(layers) else layers[li]
        entries.append({"created": h.get("created"), "created_by": h.get("created_by", ""),
                        "comment": h.get("comment", ""),
                        "empty_layer": empty,
                        "diff_id": layer.diff_id if layer else None,
                        "size": sizes[li] if layer else 0})
        if layer:
            li += 1
    for extra in layers[li:]:            # layers the history does not describe
        entries.append({"created": None, "created_by": "", "comment": "", "empty_layer": False,
                        "diff_id": extra.diff_id, "size": sizes[layers.index(extra)]})
    entries.reverse()
    if as_json:
        emit_json({"version": 1, "id": img.id, "history": entries})
        return 0
    rows = []
    for e in entries:
        by = e["created_by"]
        if not no_trunc and len(by) > 45:
            by = by[:44] + "…"
        rows.append([_short(e["diff_id"]) if e["diff_id"] else "<missing>", _ago(e["created"]),
                     by, human_size(e["size"]), e["comment"]])
    _table(rows, ["LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT"])
    return 0


# --------------------------------------------------------------------------- names and removal

@cli.command("tag")
@click.argument("source")
@click.argument("target")
@store_options
def tag_cmd(store, source, target):
    """Give the image SOURCE the name TARGET."""
    name = store().tag(source, target)
    click.echo(name)
    return 0


@cli.command("rmi")
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True,
              help="Remove even when mounted (unmounting it) or named several times.")
@_json_option
@store_options
def rmi_cmd(store, refs, force, as_json):
    """Remove names, and images with the layers and blobs nothing else uses."""
    s = store()
    with s.reading():                # an unknown name removes nothing, not the names before it
        for ref in refs:
            s.resolve(ref)
    results = []
    for ref in refs:
        r = s.rmi(ref, force=force)
        results.append(r)
        if not as_json:
            for n in r.untagged:
                click.echo(f"Untagged: {n}")
            for i in r.deleted_images:
                click.echo(f"Deleted: {i}")
            for c in r.deleted_layers:
                click.echo(f"Deleted layer: {c}")
    if as_json:
        emit_json({"version": 1, "results": [r.to_json() for r in results]})
    return 0


@cli.command("prune")
@click.option("--blobs", is_flag=True,
              help="Also drop layer blobs that tar-split records regenerate (saves disk; an "
                   "OCI save then compresses them again).")
@click.option("-a", "--untagged", is_flag=True, help="Also remove images without a name.")
@_json_option
@store_options
def prune_cmd(store, blobs, untagged, as_json):
    """Remove what no image references: layers, blobs, leftovers."""
    r = store().prune(blobs=blobs, untagged=untagged)
    if as_json:
        emit_json({"version": 1, **r.to_json()})
        return 0
    click.echo(f"Deleted {len(r.deleted_images)} image(s), {len(r.deleted_layers)} layer(s), "
               f"{len(r.deleted_blobs)} blob(s); reclaimed {human_size(r.reclaimed)}")
    return 0


# --------------------------------------------------------------------------- mounts

@cli.command("mount")
@click.argument("ref")
@store_options
def mount_cmd(store, ref):
    """Mount a read-only view of the image; prints its path.  Each mount needs an unmount."""
    click.echo(store().mount(ref))
    return 0


@cli.command("unmount")
@click.argument("ref")
@click.option("-a", "--all", "all_mounts", is_flag=True, help="Drop every mount of the image.")
@store_options
def unmount_cmd(store, ref, all_mounts):
    """Drop a mount of the image made by `layerfs mount`."""
    store().unmount(ref, all_mounts=all_mounts)
    return 0


# --------------------------------------------------------------------------- checking

@cli.command("fsck")
@click.option("--quick", is_flag=True, help="Skip re-hashing blobs and rebuilding layers.")
@_quiet_option
@_json_option
@store_options
def fsck_cmd(store, quick, quiet, as_json):
    """Re-verify every digest of the store; exit status 1 when something is wrong."""
    s = store()
    t0 = time.monotonic()
    with _progress(quiet) as prog:
        rep = s.fsck(content=not quick, progress=prog)
    if as_json:
        emit_json({"version": 1, **rep.to_json()})
    else:
        for p in rep.problems:                  # the findings: stdout
            click.echo(str(p))
        if not quiet:                           # the summary: stderr, as diff's
            click.echo(f"checked {rep.blobs} blob(s), {rep.layers} layer(s) "
                       f"({rep.layers_verified} rebuilt from their records), {rep.images} "
                       f"image(s), {rep.names} name(s) in {time.monotonic() - t0:.1f}s: "
                       f"{'ok' if rep.ok else f'{len(rep.problems)} problem(s)'}", err=True)
    return 0 if rep.ok else EXIT_DIFFERENT


__all__ = ["store_options"]
