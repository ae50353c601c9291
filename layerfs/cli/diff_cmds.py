"""Verbs on differences: diff, layers."""
from __future__ import annotations

import json
import re
import sys
import time
from typing import Optional

import click

from . import EXIT_DIFFERENT, EXIT_OK, cli
from ._output import emit_json, human_size, progress, progress_enabled
from ._root import check_store_to_read
from ..diff.output import JSON_VERSION, change_record, format_change, summary_text

_SOURCE_HELP = ("OLD and NEW: a directory, a layer tarball (tar, tar.gz, tar.zst), an OCI "
                "layout (oci:PATH[:TAG], directory or tar), a docker-archive "
                "(docker-archive:PATH[:REF]), an overlay upper directory (upper:PATH), "
                "store:REF, or empty:; PATH#N picks layer N of an image.")


@cli.command("diff", epilog=_SOURCE_HELP)
@click.argument("old")
@click.argument("new")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--json-lines", "json_lines", is_flag=True,
              help="JSON records on stdout, one per line, as they are found.")
@click.option("--semantic", is_flag=True,
              help="Compare content and effective metadata only (no mtimes).")
@click.option("--ignore", "ignore", multiple=True, metavar="FIELDS",
              help="Fields not to compare, comma-separated: mtime, owner, uid, gid, mode, "
                   "xattr, xattr:NAME, content, size, linkname, rdev, hardlinks, opaque.")
@click.option("--include", "include", multiple=True, metavar="GLOB",
              help="Only paths matching GLOB (or below a match). With a '/': anchored at "
                   "the root, '*' '?' '[...]' within a component, '**' any number of "
                   "them; without: any component name. Repeatable.")
@click.option("--exclude", "exclude", multiple=True, metavar="GLOB",
              help="Skip paths matching GLOB and everything below (same patterns as "
                   "--include). Repeatable.")
@click.option("--raw", is_flag=True, help="Raw view of both sides (a layer's own entries, "
              "whiteouts as deletions).")
@click.option("--raw-old", is_flag=True, help="Raw view of OLD.")
@click.option("--raw-new", is_flag=True, help="Raw view of NEW.")
@click.option("--no-renames", is_flag=True, help="Do not pair deletions and additions of "
              "the same content as renames.")
@click.option("--dir-mtime", is_flag=True, help="Compare directories' mtimes too.")
@click.option("--layer-info", is_flag=True, help="Show the layer that made each change.")
@click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
              help="Image of a multi-platform index (default: this machine's).")
@click.option("--exit-zero", is_flag=True, help="Exit 0 even when there are differences.")
@click.option("-q", "--quiet", is_flag=True, help="No summary or progress on stderr.")
@click.pass_context
def diff_cmd(ctx, old, new, as_json, json_lines, semantic, ignore, include, exclude, raw, raw_old,
             raw_new, no_renames, dir_mtime, layer_info, platform, exit_zero, quiet):
    """Show what changed from OLD to NEW, and which layer did it.

    One line per change: A (added), D (deleted), M (modified), T (type
    changed) or R (renamed), the path and the fields that changed.  Exit
    status 0 when they are the same, 1 when they differ, 2 on error.
    """
    from ..diff import engine, sources
    if as_json and json_lines:
        raise click.UsageError("--json and --json-lines exclude each other")
    show = progress_enabled(quiet)
    start = time.monotonic()
    root = (ctx.find_object(dict) or {}).get("root")
    check_store_to_read(root, (old, new))
    a = sources.open_source(old, "raw" if (raw or raw_old) else None, platform=platform,
                            store_root=root)
    try:
        b = sources.open_source(new, "raw" if (raw or raw_new) else None, platform=platform,
                                store_root=root)
    except BaseException:
        a.close()
        raise
    try:
        opts = engine.Options.make(ignore=ignore, include=include, exclude=exclude,
                                   dir_mtime=dir_mtime, renames=not no_renames,
                                   semantic=semantic)
        if as_json or json_lines or layer_info:
            # the output shows layer digests: a layer scanned without them (an
            # uncompressed file read in place) is hashed alongside the comparison
            for src in (a, b):
                for layer in getattr(src, "layers", None) or ():
                    layer.hash_early = True
        d = engine.compare_sources(a, b, opts)
        options = {"semantic": semantic, "ignore": sorted(opts.ignore) +
                   [f"xattr:{x}" for x in opts.ignore_xattrs], "include": list(include),
                   "exclude": list(exclude), "renames": opts.renames, "dir_mtime": dir_mtime}
        progress(f"comparing {a.name} ({a.kind}, {a.view}) with {b.name} ({b.kind}, {b.view})",
                 show)
        out = sys.stdout          # paths that are not UTF-8 go out as bytes (cli.main)
        if json_lines:
            out.write(json.dumps({"record": "header", "version": JSON_VERSION,
                                  "old": a.describe(), "new": b.describe(),
                                  "options": options}) + "\n")
        records = [] if as_json else None
        for c in d:
            if as_json:
                records.append(change_record(c))
            elif json_lines:
                out.write(json.dumps({"record": "change", **change_record(c)}) + "\n")
            else:
                out.write(format_change(c, layer_info) + "\n")
        if json_lines:
            out.write(json.dumps({"record": "summary", **d.summary.as_dict()}) + "\n")
        if as_json:
            emit_json({"version": JSON_VERSION, "old": a.describe(), "new": b.describe(),
                       "options": options, "changes": records, "summary": d.summary.as_dict()})
        out.flush()
        if not quiet:
            click.echo(summary_text(d.summary), err=True)
        progress(f"compared in {time.monotonic() - start:.2f}s", show)
        if d.summary.changes and not exit_zero:
            return EXIT_DIFFERENT
        return EXIT_OK
    finally:
        a.close()
        b.close()


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024, "m": 10**6,
          "mb": 10**6, "mib": 2**20, "mi": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30,
          "gi": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40, "ti": 2**40}


def parse_size(text: str, option: Optional[str] = None) -> int:
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise click.BadParameter(f"not a size: {text!r} (e.g. 1048576, 10MB, 1.5GiB)",
                                 param_hint=option)
    return int(float(m.group(1)) * _UNITS[unit])


def parse_ratio(text: str, option: Optional[str] = None) -> float:
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise click.BadParameter(f"not a ratio: {text!r} (e.g. 0.95 or 95%)",
                                 param_hint=option) from None
    if not 0 <= v <= 1:
        raise click.BadParameter(f"{text!r} is not between 0 and 1 (0% and 100%)",
                                 param_hint=option)
    return v


@cli.command("layers", epilog="SOURCE: an image (oci:PATH[:TAG], docker-archive:PATH[:REF], "
             "or a path detected as one), or several layer tarballs, bottom first.")
@click.argument("sources", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--details", is_flag=True, help="List every path each layer added, modified "
              "and deleted (JSON), and every wasted copy (text).")
@click.option("--top", default=10, show_default=True, metavar="N",
              help="Wasted copies listed in the text report (largest first).")
@click.option("--max-wasted-bytes", default=None, metavar="SIZE",
              help="Exit 1 when more bytes than SIZE are wasted (e.g. 20MB).")
@click.option("--min-efficiency", default=None, metavar="RATIO",
              help="Exit 1 when the efficiency is below RATIO (0.95 or 95%).")
@click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
              help="Image of a multi-platform index (default: this machine's).")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.pass_context
def layers_cmd(ctx, sources, as_json, details, top, max_wasted_bytes, min_efficiency, platform,
               quiet):
    """Per-layer sizes, changes and wasted bytes of an image, with a CI gate.

    A layer wastes the bytes it stores that a later layer overwrites or
    deletes; each wasted copy says which layer made it waste and why (deleted,
    or the fields that differ: content, mode, owner, mtime, xattr).
    """
    from ..diff import layers as L, sources as S
    max_wasted = parse_size(max_wasted_bytes, "'--max-wasted-bytes'") \
        if max_wasted_bytes is not None else None
    min_eff = parse_ratio(min_efficiency, "'--min-efficiency'") \
        if min_efficiency is not None else None
    show = progress_enabled(quiet)
    start = time.monotonic()
    root = (ctx.find_object(dict) or {}).get("root")
    check_store_to_read(root, sources)
    src = S.open_source(sources[0], platform=platform, store_root=root) \
        if len(sources) == 1 else S.layer_stack(sources)
    try:
        if not isinstance(src, S.LayerStackSource):
            raise click.UsageError(f"{src.name}: not an image or layer tarball (a {src.kind})")
        progress(f"reading {len(src.layers)} layer(s) of {src.name}", show)
        report = L.analyze_layers(src, details=details)
    finally:
        src.close()
    failures = []
    if max_wasted is not None and report.wasted_bytes > max_wasted:
        failures.append(f"{report.wasted_bytes} bytes wasted, more than the "
                        f"{max_wasted} allowed")
    if min_eff is not None and report.efficiency < min_eff:
        failures.append(f"efficiency {report.efficiency:.6f} is below {min_eff:.6f}")
    if as_json:
        doc = {"version": JSON_VERSION, **report.as_dict(details)}
        doc["gate"] = {"max_wasted_bytes": max_wasted, "min_efficiency": min_eff,
                       "passed": not failures, "failures": failures}
        emit_json(doc)
    else:
        _print_layers(report, top, details)
    progress(f"analysed in {time.monotonic() - start:.2f}s", show)
    for f in failures:
        click.echo(f"layerfs: gate failed: {f}", err=True)
    return EXIT_DIFFERENT if failures else EXIT_OK


def _print_layers(report, top: int, details: bool) -> None:
    echo = click.echo
    echo(f"{'#':>3}  {'size':>9}  {'content':>9}  {'added':>6}  {'modif':>6}  {'del':>5}  "
         f"{'wasted':>9}  created by")
    for r in report.layers:
        info = r.info
        cb = (info.created_by or info.comment or info.name or "").strip().replace("\n", " ")
        if len(cb) > 70:
            cb = cb[:67] + "..."
        size = info.size if info.size is not None else info.tar_size or 0
        echo(f"{info.index:>3}  {human_size(size):>9}  {human_size(r.content_bytes):>9}  "
             f"{r.added:>6}  {r.modified:>6}  {r.deleted:>5}  {human_size(r.wasted_bytes):>9}  "
             f"{cb}")
    items = sorted((w for r in report.layers for w in r.wasted), key=lambda w: (-w.size, w.path))
    if items:
        shown = items if details else items[:max(0, top)]
        if shown:
            echo("")
            echo("wasted copies (layer → later layer: why):")
            for w in shown:
                why = ", ".join(w.reason)
                if why in ("mode", "owner", "mtime", "xattr"):
                    why += " only"
                echo(f"  {human_size(w.size):>9}  {w.path}  (layer {w.layer} → {w.by_layer}: "
                     f"{why})")
            if len(shown) < len(items):
                echo(f"  ... and {len(items) - len(shown)} more")
    echo("")
    echo(f"efficiency {report.efficiency * 100:.2f}%: {human_size(report.wasted_bytes)} wasted "
         f"of {human_size(report.total_bytes)} stored; image {human_size(report.image_bytes)} "
         f"in {report.files} files")
