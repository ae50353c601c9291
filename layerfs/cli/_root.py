"""Checks of the store root the commands are given, made before a store is opened
(opening one creates it)."""
from __future__ import annotations

import os
from typing import Iterable, Optional

import click

def check_new_root(root: str) -> None:
    """A --root that is not a store yet must be missing or empty: a directory of
    other files (a typo, $HOME) is not turned into one.  It may hold what a
    store puts there, and what a filesystem made for one holds before that."""
    from ..store.store import STORE_ENTRIES
    try:
        names = set(os.listdir(root))
    except (FileNotFoundError, NotADirectoryError):
        return
    if "store.json" in names:
        return
    other = sorted(names - STORE_ENTRIES - {"lost+found"})
    if other:
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        raise click.BadParameter(f"{root}: not a layerfs store, and not empty (it holds "
                                 f"{', '.join(map(repr, other[:3]))}{more})",
                                 param_hint="'--root'")


def check_store_to_read(root: Optional[str], specs: Iterable[str]) -> None:
    """diff and layers only read a store: when a source is store:REF, the store must
    exist (opening a missing one would create it, in any directory)."""
    if not any(s.startswith("store:") and not os.path.lexists(s) for s in specs):
        return
    if root is None:
        from ..store.store import default_root
        root = default_root()
    if not os.path.isfile(os.path.join(root, "store.json")):
        from ..errors import NotFound
        raise NotFound("no layerfs store there (load or import an image first, or give "
                       "--root)", root)
