"""Image references, parsed and normalised the way Docker does.

``[registry[:port]/][namespace/]repo[:tag][@sha256:<hex>]``

- a first component without ``.`` or ``:`` (and not ``localhost``) is not a
  registry: the registry is ``docker.io``;
- on ``docker.io`` a single-component repository lives in ``library/``;
- with neither tag nor digest the tag is ``latest``.

>>> str(parse("ubuntu"))
'docker.io/library/ubuntu:latest'
>>> parse("localhost:5000/team/app:1.2").registry
'localhost:5000'
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
_LEGACY_REGISTRIES = {"index.docker.io", "registry-1.docker.io"}

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_PATH_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_DOMAIN_RE = re.compile(rf"^{_DOMAIN}$")
_TAG_RE = re.compile(rf"^{_TAG}$", re.ASCII)       # \w as Go has it: [0-9A-Za-z_]
_DIGEST_RE = re.compile(rf"^{_DIGEST}$")
_ID_RE = re.compile(r"^(?:sha256:)?[0-9a-f]{64}$")
# (matched with fullmatch: "$" alone would let a final newline through, and
# "alpine:latest\n" would be a name that lists like alpine:latest)

NAME_MAX = 255


class ReferenceError(ValueError):
    """A string that is not a valid image reference."""


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str          # path below the registry, e.g. "library/ubuntu"
    tag: Optional[str]
    digest: Optional[str]

    @property
    def name(self) -> str:
        """registry/repository."""
        return f"{self.registry}/{self.repository}"

    def familiar(self) -> str:
        """The short form Docker prints: "ubuntu:latest", "team/app:1"."""
        repo = self.repository
        if self.registry == DEFAULT_REGISTRY:
            if repo.startswith("library/") and repo.count("/") == 1:
                repo = repo[len("library/"):]
        else:
            repo = self.name
        return repo + (f":{self.tag}" if self.tag else "") + \
            (f"@{self.digest}" if self.digest else "")

    def with_tag(self, tag: str) -> "Reference":
        return Reference(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + \
            (f"@{self.digest}" if self.digest else "")


def _split_domain(name: str):
    i = name.find("/")
    if i == -1:
        return DEFAULT_REGISTRY, name
    first = name[:i]
    if "." not in first and ":" not in first and first != "localhost" \
            and first.lower() == first:
        return DEFAULT_REGISTRY, name
    return first, name[i + 1:]


def parse(text: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalise a reference; raise ReferenceError naming what is wrong."""
    if not isinstance(text, str) or not text:
        raise ReferenceError("empty image reference")
    s = text
    digest = None
    if "@" in s:
        s, digest = s.split("@", 1)
        if not _DIGEST_RE.fullmatch(digest):
            raise ReferenceError(f"invalid digest in reference {text!r}")
        algo, hexpart = digest.split(":", 1)
        if algo == "sha256" and len(hexpart) != 64:
            raise ReferenceError(f"invalid sha256 digest in reference {text!r}")
        digest = digest.lower() if algo == "sha256" else digest
    tag = None
    slash = s.rfind("/")
    colon = s.rfind(":")
    if colon > slash:
        s, tag = s[:colon], s[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise ReferenceError(f"invalid tag {tag!r} in reference {text!r}")
    if not s:
        raise ReferenceError(f"missing repository name in reference {text!r}")
    registry, path = _split_domain(s)
    if registry in _LEGACY_REGISTRIES:
        registry = DEFAULT_REGISTRY
    if registry != DEFAULT_REGISTRY and not _DOMAIN_RE.fullmatch(registry):
        raise ReferenceError(f"invalid registry {registry!r} in reference {text!r}")
    if path.lower() != path:
        raise ReferenceError(f"repository name must be lowercase: {text!r}")
    if not _PATH_RE.fullmatch(path):
        raise ReferenceError(f"invalid repository name {path!r} in reference {text!r}")
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = "library/" + path
    if len(registry) + 1 + len(path) > NAME_MAX:
        raise ReferenceError(f"repository name longer than {NAME_MAX} characters: {text!r}")
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)


def looks_like_id(text: str) -> bool:
    """A full image/layer id ("sha256:<64 hex>" or 64 hex)."""
    return bool(_ID_RE.fullmatch(text))
