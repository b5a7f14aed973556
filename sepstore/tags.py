"""tags: every model and tag a store holds, as ``docker images`` lists images.

Each row is read from the tag's manifest (its digest, layer count and bytes) and from the store's
listing (``modified``: when the manifest object was last written, i.e. when that tag was last
published or moved; not when the model was trained or converted).
"""

from __future__ import annotations

import datetime as dt
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .errors import NotFoundError, RefError, SepstoreError, StoreError
from .manifest import decode_manifest, manifest_digest
from .refs import OCI_SCHEME, is_manifest_url
from .store import MANIFESTS_DIR, Store, check_name, modified_time

__all__ = ["TagInfo", "tags"]

#: Manifests read at once from a remote store.
_READERS = 8


@dataclass(frozen=True)
class TagInfo:
    """One tag of one model: its manifest's URL and digest, layer count, bytes of its distinct
    parts, and when the manifest was last written (UTC; ``None`` if the backend does not say).
    A manifest that cannot be read or decoded has ``error`` set and no digest, layers or bytes."""

    name: str
    tag: str
    url: str
    digest: str | None
    layers: int | None
    bytes: int | None
    modified: dt.datetime | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tag": self.tag,
            "manifest": self.url,
            "digest": self.digest,
            "layers": self.layers,
            "bytes": self.bytes,
            "modified": self.modified.isoformat() if self.modified is not None else None,
            "error": self.error,
        }


def tags(
    store: str | os.PathLike[str] | Store, *, name: str | None = None, storage_options: dict[str, Any] | None = None
) -> list[TagInfo]:
    """Every model and tag in ``store`` (only model ``name``'s, if given), sorted by name then tag.

    ``store`` is a store root on any backend that lists (local disk, S3, ``memory://``), or an OCI
    registry repository (``oci://HOST/REPOSITORY``: one model, its tags); an HTTP server cannot
    list, so one is refused (read a manifest URL with :func:`sepstore.resolve` instead).
    A manifest that does not decode is listed with its ``error``, not fatal: the others still show.

    Raises:
        StoreError: the store is served over HTTP, or cannot be read. RefError: ``store`` is a
            manifest URL, or ``name`` is malformed. NotFoundError: nothing is at ``store``.
    """
    if isinstance(store, str | os.PathLike) and os.fspath(store).startswith(OCI_SCHEME):
        from .oci.layout import registry_for, tags_oci  # a registry repository: its tags are the model's

        url = os.fspath(store)
        rows = tags_oci(url, registry=registry_for(url[len(OCI_SCHEME) :].split("/", 1)[0], storage_options))
        return [row for row in rows if name in (None, row.name)]
    if isinstance(store, str | os.PathLike) and is_manifest_url(os.fspath(store)):
        raise RefError(f"{os.fspath(store)} is a manifest; tags lists a store root (read one manifest with `info`)")
    if name is not None:
        try:
            check_name(name)
        except StoreError as exc:
            raise RefError(str(exc)) from None
    opened = store if isinstance(store, Store) else Store(store, storage_options)
    if not opened.can_list:
        raise StoreError(
            f"{opened.url}: an HTTP server cannot list the models it holds; give a manifest URL "
            f"({opened.url}/{MANIFESTS_DIR}/<name>/<tag>.json) to `sepstore info`, or list the store "
            "where it is published (its folder or bucket)"
        )
    entries = opened.manifest_entries()
    if not entries:
        opened.require()
    chosen = sorted(key for key in entries if name in (None, key[0]))
    with ThreadPoolExecutor(1 if opened.local else _READERS, "sepstore-tags") as pool:
        rows = list(pool.map(lambda key: _row(opened, *key, entries[key]), chosen))
    return [row for row in rows if row is not None]


def _row(store: Store, name: str, tag: str, entry: dict[str, Any]) -> TagInfo | None:
    """The tag's row; ``None`` if its manifest was deleted since the listing."""
    url = store.manifest_url(name, tag)
    seconds = modified_time(entry)
    modified = dt.datetime.fromtimestamp(seconds, dt.timezone.utc) if seconds is not None else None
    try:
        data = store.read_manifest_bytes(name, tag)
        manifest = decode_manifest(data, source=url)
    except NotFoundError:
        return None
    except SepstoreError as exc:
        return TagInfo(name, tag, url, None, None, None, modified, str(exc))
    return TagInfo(name, tag, url, manifest_digest(data), manifest.n_layers, manifest.total_bytes, modified)
