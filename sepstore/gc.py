"""gc: delete the parts no manifest in a store references, once they are older than a grace period."""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass
from typing import Any

from .errors import StoreError
from .manifest import decode_manifest
from .store import TEMP_PATTERN, Store, backend_errors

__all__ = ["DEFAULT_GRACE", "GcReport", "gc"]

#: Parts younger than this are kept even when unreferenced: a publish in flight writes its parts
#: before its manifest.
DEFAULT_GRACE = 3600.0


@dataclass(frozen=True)
class GcReport:
    """What gc removed (or, in a dry run, would remove) and what it kept."""

    removed: list[str]
    removed_bytes: int
    kept: int
    young: list[str]
    dry_run: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": self.removed,
            "removed_bytes": self.removed_bytes,
            "kept": self.kept,
            "young": self.young,
            "dry_run": self.dry_run,
        }


def _mtime(info: dict[str, Any]) -> float | None:
    """Modification time of a listing entry, across backends (local ``mtime``, S3 ``LastModified``)."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, dt.datetime):
            return value.timestamp()
    return None


def _referenced(store: Store) -> set[str]:
    """The hex digests of every part every manifest in ``store`` names (all must decode)."""
    referenced: set[str] = set()
    for name, tag in store.list_manifests():
        url = store.url_of(store.manifest_path(name, tag))
        manifest = decode_manifest(store.read_manifest_bytes(name, tag), source=url)
        referenced.update(part.digest.removeprefix("blake3:") for _, part in manifest.labelled_parts())
    return referenced


def _listing(store: Store) -> list[dict[str, Any]]:
    """Every entry of the parts folder, and the temporary files a killed publisher left among the
    manifests (``manifests/<name>/.tmp-*.json``; a ``.lock`` file exists only while a process holds it, so it stays)."""
    entries: list[dict[str, Any]] = []
    for folder in (store.parts_dir, store.manifests_dir):
        with backend_errors(store.url_of(folder)):
            if not store.is_local:
                store.fs.invalidate_cache(folder)
            if not store.fs.exists(folder):
                continue
            if folder == store.parts_dir:
                entries += store.fs.ls(folder, detail=True)
            else:
                found = store.fs.find(folder, detail=True).values()
                entries += [info for info in found if TEMP_PATTERN.match(info["name"].rsplit("/", 1)[-1])]
    return entries


def gc(
    store: str | os.PathLike[str] | Store,
    *,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> GcReport:
    """Delete every part file that no manifest in ``store`` references, and every temporary file
    an interrupted write left, once older than ``grace`` seconds. Every manifest must decode first: a store
    with an unreadable manifest is left untouched (its parts cannot be told apart from orphans)."""
    if grace < 0:
        raise StoreError(f"grace must be a number of seconds >= 0, got {grace}")
    target = store if isinstance(store, Store) else Store(store, storage_options)
    target.require()
    referenced = _referenced(target)
    listing = _listing(target)
    referenced |= _referenced(target)  # and what was published while the parts were listed
    now = time.time()
    removed: list[str] = []
    young: list[str] = []
    removed_bytes = kept = 0
    for info in listing:
        path = info["name"]
        base = path.rsplit("/", 1)[-1]
        stem = base.removesuffix(".safetensors")
        if stem in referenced:
            kept += 1
            continue
        is_part = base.endswith(".safetensors") and len(stem) == 64
        if not (is_part or TEMP_PATTERN.match(base)):
            continue  # not ours: leave it
        modified = _mtime(info)
        if modified is None or now - modified < grace:
            young.append(base)
            continue
        if not dry_run:
            with backend_errors(target.url_of(path)):
                target.fs.rm_file(path)
        removed.append(base)
        removed_bytes += int(info.get("size") or 0)
    return GcReport(sorted(removed), removed_bytes, kept, sorted(young), dry_run)
