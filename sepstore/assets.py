"""Assets: a model's non-weight files (tokenizer, configs, chat template, license), stored
content-addressed beside the parts and listed in the manifest (format version 2) by relative path.

They travel the parts' ways: written by ``dump`` (``assets=``) and ``convert``, copied by ``push``,
fetched into the cache (the same bounded, verified transfers as parts) by ``pull`` and
:func:`assets`, and checked against their digest before a path to them is handed out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec

from .backends import open_url, stream_range
from .errors import ManifestError, StoreError
from .hashing import Hasher, digest_buffer, digest_of
from .manifest import MAX_ASSET_BYTES, Asset, Manifest, is_asset_path
from .reader import PartReader
from .refs import FETCH_OPTIONS, RefLike, RefOptions, open_ref
from .safetensors_io import pwrite_all
from .store import Store, backend_call

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AssetFile", "AssetInput", "assets", "check_asset_paths", "fetch_assets", "merge_assets", "write_assets"]


@dataclass(frozen=True)
class AssetFile:
    """A file to store as an asset, on any fsspec filesystem, with its size as listed there."""

    fs: fsspec.AbstractFileSystem
    path: str
    url: str
    size: int


#: What ``dump(assets={path: ...})`` takes for a file: its bytes, a local path or fsspec URL, or an :class:`AssetFile`.
AssetInput = bytes | str | os.PathLike[str] | AssetFile


def check_asset_paths(paths: Mapping[str, object] | None) -> dict[str, object]:
    """``dump``'s ``assets=`` checked before anything is written: a mapping of valid relative paths."""
    if paths is None:
        return {}
    if not isinstance(paths, Mapping):
        raise ManifestError(f"assets= is a mapping of relative path to bytes or file, got {type(paths).__name__}")
    for path in paths:
        if not is_asset_path(path):
            raise ManifestError(
                f"asset path {path!r:.300} is refused: use a relative path of '/'-separated segments, none empty, "
                "'.' or '..', without '\\', ':' or control characters (e.g. 'tokenizer.json', '1_Pooling/config.json')"
            )
    return dict(paths)


def _opened(path: str, value: object) -> bytes | AssetFile:
    """An asset's source as bytes or a sized file; anything else is a :class:`ManifestError`."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if len(data) > MAX_ASSET_BYTES:
            raise ManifestError(
                f"asset {path!r} is {len(data)} bytes, over the {MAX_ASSET_BYTES}-byte limit for an asset"
            )
        return data
    if isinstance(value, AssetFile):
        return value
    if not isinstance(value, str | os.PathLike):
        raise ManifestError(f"asset {path!r}: expected bytes, a path or a URL, got {type(value).__name__}")
    url = os.fspath(value)
    fs, where = open_url(url)
    if backend_call(fs, url, lambda: fs.isdir(where)):
        raise ManifestError(f"asset {path!r}: {url} is a folder; give each file as its own asset")
    return AssetFile(fs, where, url, int(backend_call(fs, url, lambda: fs.size(where))))


def _stage(store: Store, path: str, source: bytes | AssetFile) -> tuple[Asset, str]:
    """Copy an asset's bytes into a temporary file of ``store``, hashing them on the way."""
    if isinstance(source, bytes):

        def write_bytes(fd: int) -> Asset:
            pwrite_all(fd, source, 0)
            return Asset(digest_buffer(source), len(source))

        return store.stage_blob(write_bytes)
    if source.size > MAX_ASSET_BYTES:
        raise ManifestError(
            f"asset {path!r} ({source.url}) is {source.size} bytes, over the {MAX_ASSET_BYTES}-byte limit for an asset"
        )

    def write_file(fd: int) -> Asset:
        hasher = Hasher()

        def write(offset: int, piece: bytes) -> None:
            pwrite_all(fd, piece, offset)
            hasher.update(piece)

        def copy() -> None:
            hasher.reset()
            stream_range(source.fs, source.path, source.url, 0, source.size, source.size, write)

        if source.size:
            backend_call(source.fs, source.url, copy)
        return Asset(digest_of(hasher), source.size)

    return store.stage_blob(write_file)


def write_assets(store: Store, given: Mapping[str, object], protect: Callable[[str], None]) -> dict[str, Asset]:
    """Store each of ``given`` (path -> bytes, path or :class:`AssetFile`) in ``store`` and return
    the manifest's entries; ``protect(digest)`` (a publisher's lease) runs before each is looked for."""
    out: dict[str, Asset] = {}
    for path, value in sorted(given.items()):
        asset, tmp = _stage(store, path, _opened(path, value))
        store.commit_blob(tmp, asset, protect=protect)
        out[path] = asset
    return out


def merge_assets(previous: Mapping[str, Asset], new: Mapping[str, Asset], *, where: str) -> dict[str, Asset]:
    """The assets of a combining dump: the previous call's and this call's; the same path with other
    content is a :class:`ManifestError` (replace the tag with ``force=True`` instead)."""
    for path in previous.keys() & new.keys():
        if previous[path] != new[path]:
            raise ManifestError(
                f"{where}: asset {path!r} is already in this model with other content ({previous[path].digest}, "
                f"now {new[path].digest}); pass force=True (CLI: convert --force) to replace the tag, or use "
                "another tag"
            )
    return dict(sorted({**previous, **new}.items()))


def assets(ref: RefLike, **options: Unpack[RefOptions]) -> dict[str, Path]:
    """Verified local copies of the model's assets, by their path in the model
    (``{"tokenizer.json": Path(...)}``); none for a manifest without assets (format version 1).

    A local store's files are used where they are, a remote store's are fetched into the cache
    (``cache_dir``, default ``$SEPSTORE_CACHE``) as parts are. Every file is checked against its
    size and digest before it is returned; a cached copy that fails is fetched again, a local
    store's that fails is an :class:`~sepstore.errors.IntegrityError`. The files are named by
    their digest: copy them to their paths to build a folder a tokenizer loader reads. ``ref`` and
    the options are as for :func:`sepstore.load`.
    """
    resolved = open_ref("assets", ref, options, FETCH_OPTIONS)
    reader = PartReader(resolved, cache_dir=options.get("cache_dir"))
    return fetch_assets(reader, resolved.manifest)


def fetch_assets(reader: PartReader, manifest: Manifest, *, quiet: bool = True) -> dict[str, Path]:
    """Check (re-hash) the assets already local, fetch the rest into the cache, verified; their paths."""
    chosen = list(manifest.labelled_assets())
    reader.recheck(chosen, rehash=True)
    reader.prefetch(chosen, desc=f"assets {manifest.name}", quiet=quiet)
    out: dict[str, Path] = {}
    for path, asset in manifest.asset_files.items():
        local = reader.path(asset)
        if not os.path.exists(local):
            raise StoreError(f"asset {path!r} of {reader.resolved.url}: {local} vanished after it was checked")
        out[path] = Path(local)
    return dict(sorted(out.items()))
