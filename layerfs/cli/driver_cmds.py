"""Verbs on storage drivers: drivers."""
from __future__ import annotations

import click

from . import cli
from ._output import emit_json
from .. import drivers as _drivers


@cli.command("drivers")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Store root to check the drivers against.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def drivers_cmd(root, as_json):
    """List the storage drivers, whether each is supported here, and why not."""
    support = _drivers.supported(root)
    try:
        default = _drivers.default(root)
    except OSError:
        default = None
    if as_json:
        emit_json({"version": 1, "default": default,
                   "drivers": [{"name": n, "supported": s.ok, "reason": s.reason}
                               for n, s in support.items()]})
        return 0
    for n, s in support.items():
        mark = "*" if n == default else " "
        state = "supported" if s.ok else "unsupported"
        click.echo(f"{mark} {n:<8} {state:<11} {s.reason}")
    return 0
