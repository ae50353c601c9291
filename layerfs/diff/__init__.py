"""Comparing trees: what changed from one directory to another.

>>> from layerfs.diff import compare_trees
>>> [c.path for c in compare_trees("old", "new")]       # doctest: +SKIP
['/etc', '/etc/hosts', '/tmp/new-file']

:func:`compare_trees` is the exact ("naive") diff every storage driver can
fall back on; see :mod:`layerfs.diff.trees` for what it compares.
"""
from .trees import (OVERLAY_PRIVATE_XATTRS, TreeChange, compare_entries, compare_trees,
                    path_key, read_xattrs, same_content, type_name, with_parents)

__all__ = ["OVERLAY_PRIVATE_XATTRS", "TreeChange", "compare_entries", "compare_trees",
           "path_key", "read_xattrs", "same_content", "type_name", "with_parents"]
