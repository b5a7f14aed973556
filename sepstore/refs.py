"""From a reference (manifest URL, or store root plus name/tag) to a verified manifest and the
location of its parts."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.core import split_protocol

from .backends import open_url
from .errors import IntegrityError, ManifestError, NotFoundError, StoreError
from .hashing import digest_hex
from .manifest import Manifest, Part, decode_manifest, manifest_digest
from .store import MANIFESTS_DIR, Store, read_limited

__all__ = ["Ref", "Resolved", "resolve"]

Ref = str | os.PathLike[str]
_LOCAL = {None, "file", "local"}


@dataclass(frozen=True)
class Resolved:
    """A manifest read and checked, with where its bytes came from and where its parts live."""

    manifest: Manifest
    url: str
    digest: str
    parts_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    data: bytes = field(default=b"", repr=False)  # the manifest's bytes, as read

    @property
    def tag(self) -> str:
        """The tag the manifest is published under: its file name without ``.json``."""
        return posixpath.basename(self.url).removesuffix(".json")

    def part_url(self, part: Part) -> str:
        return f"{self.parts_url}/{digest_hex(part.digest)}.safetensors"


def resolve(
    ref: Ref | Resolved,
    *,
    name: str | None = None,
    tag: str | None = None,
    storage_options: dict[str, Any] | None = None,
    parts_url: str | None = None,
    digest: str | None = None,
) -> Resolved:
    """Read the manifest ``ref`` names and check it (and its digest, when ``digest`` pins one).

    ``ref`` is a manifest's path or URL (``.../manifests/llama/v2.json``) or a store root; in a
    store, ``name``/``tag`` pick the manifest, and may be left out when the store holds just one
    model (``tag`` then defaults to ``latest`` or the only tag).
    """
    if isinstance(ref, Resolved):
        return ref
    if parts_url is not None and not isinstance(parts_url, str | os.PathLike):
        raise StoreError(f"parts_url= is a path or URL of a parts folder, got {parts_url!r}")
    options = dict(storage_options or {})
    url = os.fspath(ref) if isinstance(ref, str | os.PathLike) else None
    if not isinstance(url, str) or not url:
        raise NotFoundError(f"a model reference is a manifest URL or a store root, got {ref!r}")
    if url.endswith(".json"):
        if name is not None or tag is not None:
            raise StoreError(f"{url} is a manifest; name= and tag= are for a store root")
        fs, path = open_url(url, options)
        manifest_url = os.path.abspath(path) if split_protocol(url)[0] in _LOCAL else url
        data = read_limited(fs, path, manifest_url)
    else:
        store = Store(url, options)
        name, tag = _pick(store, name, tag)
        manifest_url = store.url_of(store.manifest_path(name, tag))
        data = store.read_manifest_bytes(name, tag)
    got = manifest_digest(data)
    if digest is not None and got != digest:
        raise IntegrityError(f"{manifest_url}: manifest digest is {got}, but {digest} was pinned")
    manifest = decode_manifest(data, source=manifest_url)
    location = os.fspath(parts_url).rstrip("/") if parts_url else _parts_location(manifest_url, manifest)
    return Resolved(manifest, manifest_url, got, location, options, data)


def _pick(store: Store, name: str | None, tag: str | None) -> tuple[str, str]:
    if name is not None and tag is not None:
        return name, tag
    found = store.list_manifests()
    candidates = [(n, t) for n, t in found if name in (None, n) and tag in (None, t)]
    if len(candidates) > 1 and len({n for n, _ in candidates}) == 1:
        latest = [(n, t) for n, t in candidates if t == "latest"]
        candidates = latest or candidates
    if len(candidates) == 1:
        return candidates[0]
    what = f"model {name!r}" if name is not None else "models"
    if not candidates:
        store.require()
        where = f"{store.url}/{MANIFESTS_DIR}"
        raise NotFoundError(f"no {what}{f' with tag {tag!r}' if tag else ''} in store {store.url} (looked in {where})")
    listing = ", ".join(f"{n}:{t}" for n, t in candidates)
    if len({n for n, _ in candidates}) == 1:
        raise NotFoundError(
            f"model {candidates[0][0]!r} in store {store.url} has no 'latest' tag but several others ({listing}); "
            "pick one with tag= (--tag)"
        )
    raise NotFoundError(f"store {store.url} holds several models ({listing}); pick one with name= (--name) and tag=")


def _parts_location(manifest_url: str, manifest: Manifest) -> str:
    """Where a manifest's parts live, refusing locations outside its store or of another protocol."""
    protocol, path = split_protocol(manifest_url)
    parts = manifest.parts
    parts_protocol = split_protocol(parts)[0]
    local = protocol in _LOCAL
    if parts_protocol is not None or parts.startswith("/"):
        same = (parts_protocol in _LOCAL) if local else parts_protocol == protocol
        if not same:
            raise ManifestError(
                f"{manifest_url}: field `parts` {parts!r} uses another protocol than the manifest; refused "
                "(pass parts_url= to read parts from a mirror you trust)"
            )
        return parts.rstrip("/")
    folder = posixpath.dirname(path)
    joined = posixpath.normpath(posixpath.join(folder, parts))
    # The store root is above the manifests/ folder; a manifest outside one only reaches below itself.
    own = f"/{MANIFESTS_DIR}/{manifest.name}"
    cut = len(folder) - len(own) if folder.endswith(own) else (folder + "/").rfind(f"/{MANIFESTS_DIR}/")
    root = (folder[:cut] or "/") if cut >= 0 else folder
    inside = joined == root or joined.startswith(root.rstrip("/") + "/")
    if not inside:
        raise ManifestError(f"{manifest_url}: field `parts` {parts!r} points outside the store; refused")
    return joined if local else f"{protocol}://{joined}"


def open_fs(url: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a URL, with backend errors as sepstore's."""
    return open_url(url, storage_options)
