"""Output helpers shared by the command modules: JSON to stdout, progress to stderr."""
from __future__ import annotations

import json
import sys

import click


def json_text(doc) -> str:
    """doc as JSON: an object's members one per line, a list's items one per
    line, each member or item on its own line in compact form.  Lines stay
    readable and greppable (one change, image or layer per line), and each is
    encoded by json's C encoder: an indented dump of a large diff goes through
    the pure-Python encoder, about ten times slower."""
    dumps = json.dumps

    def block(items, open_: str, close: str) -> str:
        if not items:
            return open_ + close
        return open_ + "\n" + ",\n".join(items) + "\n" + close

    def value(v, indent: str) -> str:
        if isinstance(v, list) and v:
            inner = indent + "  "
            return block([inner + dumps(x) for x in v], "[", indent + "]")
        return dumps(v)

    if isinstance(doc, dict):
        return block([f"  {dumps(k)}: {value(v, '  ')}" for k, v in doc.items()], "{", "}")
    return value(doc, "")


def emit_json(doc) -> None:
    click.echo(json_text(doc))


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
