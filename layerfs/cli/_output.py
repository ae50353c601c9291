"""Output helpers shared by the command modules: JSON to stdout, progress to stderr."""
from __future__ import annotations

import json
import sys

import click


LINE = 1000    # a value whose compact form fits in this many characters takes one line


def json_text(doc, width: int = LINE) -> str:
    """doc as indented JSON in which every value that fits on one line (a diff
    change, an image, a layer record) is written on one line in compact form.
    The output stays readable and greppable (one change per line), and json's
    C encoder writes every line: indenting a whole large diff with json's
    pure-Python encoder is several times slower.  width: the longest line a
    value is kept on (documents read by eye, like inspect, take a short one)."""
    dumps = json.dumps

    def value(v, indent: str, top: bool = False) -> str:
        if not isinstance(v, (dict, list)) or not v:
            return dumps(v)
        if not top and 3 * len(v) < width:       # (more items cannot fit at all)
            flat = dumps(v)
            if len(indent) + len(flat) <= width:
                return flat
        inner = indent + "  "
        if isinstance(v, dict):
            items = [f"{inner}{dumps(k)}: {value(x, inner)}" for k, x in v.items()]
            return "{\n" + ",\n".join(items) + "\n" + indent + "}"
        return "[\n" + ",\n".join(inner + value(x, inner) for x in v) + "\n" + indent + "]"

    return value(doc, "", top=True)


def emit_json(doc, width: int = LINE) -> None:
    click.echo(json_text(doc, width))


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def progress(message: str, enabled: bool) -> None:
    if enabled:
        click.echo(message, err=True)


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"
