"""Output helpers shared by the command modules: JSON to stdout, progress to stderr."""
from __future__ import annotations

import json
import sys

import click


def emit_json(doc) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=False))


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
