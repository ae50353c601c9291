"""Comparing trees, layers and images: what changed, where, and which layer did it.

>>> from layerfs.diff import compare
>>> for c in compare("rootfs-v1", "oci:image:2.0"):              # doctest: +SKIP
...     print(c.code, c.path, sorted(c.fields))
M /etc/hosts ['content', 'size']
>>> [c.path for c in compare_trees("old", "new")]              # doctest: +SKIP
['/etc', '/etc/hosts', '/tmp/new-file']

:func:`compare` takes any two sources (directories, layer tarballs, OCI
layouts, docker-archives, overlay upper directories; see
:mod:`layerfs.diff.sources`); :func:`compare_trees` is the exact ("naive")
diff of two directories every storage driver can fall back on (see
:mod:`layerfs.diff.trees`); :func:`analyze_layers` gives each layer of an
image its size, changes and wasted bytes (:mod:`layerfs.diff.layers`).
"""
from .trees import (OVERLAY_PRIVATE_XATTRS, TreeChange, compare_entries, compare_trees,
                    path_key, read_xattrs, same_content, type_name, with_parents)
from .sources import (DirectorySource, EntryMeta, LayerInfo, LayerStackSource,
                      OverlayUpperSource, Source, empty_source, layer_stack, open_source,
                      register_transport)
from .engine import Change, Diff, Options, Summary, as_layer_changes, compare, tree_changes

__all__ = ["OVERLAY_PRIVATE_XATTRS", "TreeChange", "compare_entries", "compare_trees",
           "path_key", "read_xattrs", "same_content", "type_name", "with_parents",
           "Change", "Diff", "DirectorySource", "EntryMeta", "LayerInfo", "LayerReport",
           "LayerStackSource", "Options", "OverlayUpperSource", "Source", "StackReport",
           "Summary", "analyze_layers", "as_layer_changes", "compare", "empty_source",
           "layer_stack", "open_source", "register_transport", "tree_changes"]


def __getattr__(name: str):
    # the per-layer report is imported on first use (the diff command does not need it)
    if name in ("LayerReport", "StackReport", "analyze_layers"):
        from . import layers
        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
