"""Rendering diff changes and layer reports: text lines and JSON records.

Text, one line per change::

    M /usr/bin/ping  mode 0755→4755, xattr security.capability added
    M /etc/hosts  content (sha256 1a2b3c4d5e6f→6f5e4d3c2b1a), size 158→201
    T /lib  dir→symlink
    R /usr/bin/new ← /usr/bin/old

JSON (schema version :data:`JSON_VERSION`): each change is a record with
``path``, ``kind`` (added, deleted, modified, renamed), ``code`` (A, D, M, T,
R), ``type``, ``fields`` (name -> {"old", "new"}), ``size`` and ``digest``
({"old", "new"} of a regular file), ``hardlinks`` (the other paths of its
group), ``layer`` / ``old_layer`` (index, digest, diff_id, created_by ...) and
``old_path`` for renames.  Modes are integers, mtimes integer nanoseconds,
xattr values base64.
"""
from __future__ import annotations

import base64
import datetime as _dt
from typing import Any, Dict, Iterable, List, Optional

from .engine import Change, Summary

JSON_VERSION = 1

_ORDER = ("type", "content", "size", "linkname", "mode", "uid", "gid", "rdev", "xattr",
          "hardlinks", "opaque", "mtime")


def _field_order(name: str):
    key = "xattr" if name.startswith("xattr:") else name
    return (_ORDER.index(key) if key in _ORDER else len(_ORDER), name)


def _short(digest: Optional[str]) -> str:
    if not digest:
        return "?"
    return digest.split(":", 1)[-1][:12]


def _time(ns: int) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    try:
        t = _dt.datetime.fromtimestamp(sec, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return str(ns)
    return f"{t}.{frac:09d}Z" if frac else f"{t}Z"


def _mode(m: int) -> str:
    return f"{m:04o}"


def _links(v) -> str:
    return ",".join(v) if v else "none"


def describe_field(name: str, old: Any, new: Any) -> str:
    """One field change as text: "mode 0755→4755"."""
    if name == "type":
        return f"{old}→{new}"
    if name == "content":
        return f"content (sha256 {_short(old)}→{_short(new)})"
    if name == "mode":
        return f"mode {_mode(old)}→{_mode(new)}"
    if name == "mtime":
        return f"mtime {_time(old)}→{_time(new)}"
    if name == "rdev":
        return f"rdev {old[0]},{old[1]}→{new[0]},{new[1]}"
    if name == "linkname":
        return f"target {old}→{new}"
    if name == "hardlinks":
        return f"hardlinks {_links(old)}→{_links(new)}"
    if name == "opaque":
        return f"opaque {'yes' if old else 'no'}→{'yes' if new else 'no'}"
    if name.startswith("xattr:"):
        x = name[6:]
        if old is None:
            return f"xattr {x} added"
        if new is None:
            return f"xattr {x} removed"
        return f"xattr {x} changed"
    return f"{name} {old}→{new}"


def format_change(c: Change, layer_info: bool = False) -> str:
    """The text line of a change."""
    code = c.code
    if c.kind == "renamed":
        head = f"R {c.path} ← {c.old_path}"
    else:
        head = f"{code} {c.path}"
    parts: List[str] = []
    if code == "T":
        parts.append(describe_field("type", *c.fields["type"]))
    else:
        for name in sorted(c.fields, key=_field_order):
            parts.append(describe_field(name, *c.fields[name]))
    if c.kind == "added" and c.new is not None and c.new.type == "symlink":
        head += f" -> {c.new.linkname}"
    line = head + ("  " + ", ".join(parts) if parts else "")
    if layer_info and c.layer is not None:
        cb = (c.layer.created_by or "").strip().replace("\n", " ")
        if len(cb) > 60:
            cb = cb[:57] + "..."
        line += f"  [layer {c.layer.index}" + (f": {cb}" if cb else "") + "]"
    return line


def _value(name: str, v: Any) -> Any:
    if v is None:
        return None
    if name.startswith("xattr:"):
        return base64.b64encode(v).decode()
    if isinstance(v, tuple):
        return list(v)
    return v


def _layer(l) -> Optional[Dict[str, Any]]:
    return None if l is None else l.as_dict()


def change_record(c: Change) -> Dict[str, Any]:
    """The JSON record of a change."""
    d: Dict[str, Any] = {"path": c.path, "kind": c.kind, "code": c.code, "type": c.type}
    if c.old_path is not None:
        d["old_path"] = c.old_path
    if c.old is not None and c.new is not None and c.old.type != c.new.type:
        d["old_type"] = c.old.type
    d["fields"] = {name: {"old": _value(name, o), "new": _value(name, n)}
                   for name, (o, n) in sorted(c.fields.items(), key=lambda kv: _field_order(kv[0]))}
    if c.old_size is not None or c.new_size is not None:
        d["size"] = {"old": c.old_size, "new": c.new_size}
    do = c.old.digest if c.old is not None and c.old.type == "file" else None
    dn = c.new.digest if c.new is not None and c.new.type == "file" else None
    if "content" in c.fields:
        do, dn = c.fields["content"]
    if do or dn:
        d["digest"] = {"old": do, "new": dn}
    if c.new is not None and c.new.type == "symlink":
        d["linkname"] = c.new.linkname
    if c.hardlinks:
        d["hardlinks"] = list(c.hardlinks)
    if c.layer is not None:
        d["layer"] = _layer(c.layer)
    if c.old_layer is not None:
        d["old_layer"] = _layer(c.old_layer)
    return d


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"


def summary_text(s: Summary) -> str:
    parts = [f"{s.added} added", f"{s.deleted} deleted", f"{s.modified} modified"]
    if s.type_changed:
        parts.append(f"{s.type_changed} type changed")
    if s.renamed:
        parts.append(f"{s.renamed} renamed")
    return (f"{s.changes} change{'s' if s.changes != 1 else ''}: " + ", ".join(parts) +
            f"; +{human_size(s.bytes_added)} added, -{human_size(s.bytes_removed)} removed")


def diff_document(old: Dict[str, Any], new: Dict[str, Any], options: Dict[str, Any],
                  changes: Iterable[Change], summary: Summary) -> Dict[str, Any]:
    records = [change_record(c) for c in changes]
    return {"version": JSON_VERSION, "old": old, "new": new, "options": options,
            "changes": records, "summary": summary.as_dict()}


__all__ = ["JSON_VERSION", "change_record", "describe_field", "diff_document", "format_change",
           "human_size", "summary_text"]
