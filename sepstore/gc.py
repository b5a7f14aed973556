"""gc: delete the parts and assets no manifest in a store references, once they are older than a grace period.

A publish in flight is never broken: gc honours the publishers' leases (see :mod:`sepstore.leases`
for why no interleaving of the two can lose a part a manifest will name). Signatures go with their
tags: gc keeps those of the manifests it keeps and removes those of deleted tags, and those of a
manifest a tag no longer holds."""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from .errors import NotFoundError, SepstoreError, StoreError
from .leases import holding, live_leases
from .manifest import decode_manifest, manifest_digest
from .signing import read_claim
from .store import BLOB_FILE, TEMP_PATTERN, Store, check_name, check_tag, modified_time

__all__ = ["DEFAULT_GRACE", "GcReport", "gc"]

#: Parts younger than this are kept even when unreferenced (publishers of sepstore versions without
#: leases, and parts copied into the store by hand, have only this protection).
DEFAULT_GRACE = 3600.0


@dataclass(frozen=True)
class GcReport:
    """What gc removed (or, in a dry run, would remove) and what it kept: ``kept`` counts the
    referenced parts, ``young`` the unreferenced files within the grace period, ``leased`` the
    unreferenced parts a publish in flight relies on; ``signatures_removed`` the signature files
    of deleted tags or replaced manifests, ``signatures_kept`` those of the manifests kept."""

    removed: list[str]
    removed_bytes: int
    kept: int
    young: list[str]
    dry_run: bool
    leased: list[str]
    signatures_removed: list[str]
    signatures_kept: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": self.removed,
            "removed_bytes": self.removed_bytes,
            "kept": self.kept,
            "young": self.young,
            "leased": self.leased,
            "signatures_removed": self.signatures_removed,
            "signatures_kept": self.signatures_kept,
            "dry_run": self.dry_run,
        }


def _referenced(store: Store) -> set[str]:
    """The hex digests of every part and asset every manifest in ``store`` names (all must decode)."""
    referenced: set[str] = set()
    for name, tag in store.list_manifests():
        url = store.manifest_url(name, tag)
        try:
            data = store.read_manifest_bytes(name, tag)
        except NotFoundError:
            continue  # deleted since the listing
        manifest = decode_manifest(data, source=url)
        referenced.update(part.digest.removeprefix("blake3:") for _, part in manifest.labelled_parts())
        referenced.update(asset.digest.removeprefix("blake3:") for asset in manifest.asset_files.values())
    return referenced


def gc(
    store: str | os.PathLike[str] | Store,
    *,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    allow_empty: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> GcReport:
    """Delete every part and asset file that no manifest in ``store`` references once older than ``grace``
    seconds, and every temporary file an interrupted write left once older than that and an hour.

    Every manifest must decode first: a store with an unreadable manifest is left untouched (its
    parts cannot be told apart from orphans). A store without any manifest (a cache folder, a
    mistyped path) is refused unless ``allow_empty``: every part in it would go. Parts a publish
    in flight has leased are kept, and expired leases are deleted.
    """
    if grace < 0:
        raise StoreError(f"grace must be a number of seconds >= 0, got {grace}")
    target = store if isinstance(store, Store) else Store(store, storage_options)
    if not target.can_list_blobs:  # a registry's blobs, an HTTP server's files: unreferenced ones cannot be found
        target.list_blobs()  # its StoreError says what the store lacks and what to do instead
    if not target.can_delete:
        raise target.lacks("deletion", "delete unreferenced parts (gc)")
    target.require()
    if not allow_empty and not target.list_manifests():
        raise StoreError(
            f"{target.url} holds no manifests, so gc would delete every part in it; check the path "
            "(a store root, not a cache folder), or pass allow_empty=True (--allow-empty) if every model was removed"
        )
    referenced = _referenced(target)
    listing = target.list_blobs()
    referenced |= _referenced(target)  # and what was published while the parts were listed
    now = time.time()
    victims: list[dict[str, Any]] = []
    young: list[str] = []
    kept = 0
    for info in listing:
        base, stem = _base(info), _stem(info)
        if stem in referenced:
            kept += 1
        elif _is_blob(base) or TEMP_PATTERN.match(base):  # anything else is not ours: left alone
            if _old(info, grace, now):
                victims.append(info)
            else:
                young.append(base)
    parts = [_stem(info) for info in victims if _is_blob(_base(info))]
    removed: list[str] = []
    leased: list[str] = []
    removed_bytes = 0
    with contextlib.ExitStack() as stack:
        lease = None if dry_run else stack.enter_context(holding(target, "gc", [f"blake3:{h}" for h in parts]))
        # After gc's own lease is written, and in this order: leases, then manifests (a publisher
        # deletes its lease only after writing its manifest).
        publishing = live_leases(target, "publish", sweep=not dry_run)
        relied_on = {d.removeprefix("blake3:") for held in publishing.values() for d in held.digests}
        referenced |= _referenced(target) if parts else set()
        for info in victims:
            base, stem = _base(info), _stem(info)
            if stem in referenced:
                kept += 1  # published since the parts were listed
                continue
            if stem in relied_on:
                leased.append(base)
                continue
            if lease is not None:
                lease.check()
                current = target.entry(info["name"])
                if current is None:
                    continue  # another gc was quicker
                if not _old(current, grace, time.time()):  # written again since the listing (an older publisher)
                    young.append(base)
                    continue
                target.remove(info["name"])
            removed.append(base)
            removed_bytes += int(info.get("size") or 0)
    stale, signed = _signatures(target, grace, time.time())
    for path in stale if not dry_run else []:
        current = target.entry(path)
        # rewritten since the listing (a `sign` or `push` moving the tag): judged again next time
        judge = _old if TEMP_PATTERN.match(path.rsplit("/", 1)[-1]) else _older  # as _signatures did
        if current is not None and judge(current, grace, time.time()):
            target.remove(path)
    unsigned = sorted(target.url_of(path) for path in stale)
    return GcReport(sorted(removed), removed_bytes, kept, sorted(young), dry_run, sorted(leased), unsigned, signed)


def _signatures(store: Store, grace: float, now: float) -> tuple[list[str], int]:
    """The signature files past ``grace`` whose tag no manifest holds any more, or whose manifest
    is not the tag's (and temporary files a killed signer left, past an hour); and how many are kept.

    Signatures are listed before the manifests are read: one written after its manifest (as
    ``sign`` and ``push`` do) is then never judged against the manifest it replaced. Files that are
    not ``<name>/<tag>/<key id>.json`` are left alone, and so is one of a kept tag that does not
    decode as a bundle, as gc leaves every file it does not know."""
    held: dict[tuple[str, str], str | None] = {}
    stale: list[str] = []
    kept = 0
    for path, (name, tag, base, info) in sorted(store.signature_files().items()):
        if TEMP_PATTERN.match(base):
            if _old(info, grace, now):
                stale.append(path)
            continue
        if not _SIGNATURE_FILE.match(base) or not _is_name_and_tag(name, tag):
            continue
        if (name, tag) not in held:
            held[(name, tag)] = _manifest_digest(store, name, tag)
        digest = held[(name, tag)]
        if digest is not None and _claimed(store, name, tag, base.removesuffix(".json")) in (digest, None):
            kept += 1
        elif _older(info, grace, now):
            stale.append(path)
    return stale, kept


_SIGNATURE_FILE = re.compile(r"^[0-9a-f]{64}\.json\Z")


def _is_name_and_tag(name: str, tag: str) -> bool:
    try:
        check_name(name)
        check_tag(tag)
    except StoreError:
        return False
    return True


def _manifest_digest(store: Store, name: str, tag: str) -> str | None:
    """The digest of the manifest a tag holds, or ``None`` when it holds none (deleted)."""
    try:
        return manifest_digest(store.read_manifest_bytes(name, tag))
    except NotFoundError:
        return None


def _claimed(store: Store, name: str, tag: str, key_id: str) -> str | None:
    """The manifest digest a signature file claims, or ``None`` if it cannot be read as one."""
    try:
        return read_claim(store, name, tag, key_id)[1].digest
    except SepstoreError:
        return None


def _old(info: dict[str, Any], grace: float, now: float) -> bool:
    """Whether a listed file is past its grace period. A temporary file may be a part or manifest
    being written: only an hour-old one is surely a killed writer's, whatever ``grace`` says."""
    return _older(info, grace if _is_blob(_base(info)) else max(grace, DEFAULT_GRACE), now)


def _older(info: dict[str, Any], seconds: float, now: float) -> bool:
    modified = modified_time(info)
    return modified is not None and now - modified >= seconds


def _base(info: dict[str, Any]) -> str:
    return str(info["name"]).rsplit("/", 1)[-1]


def _stem(info: dict[str, Any]) -> str:
    return _base(info).removesuffix(".safetensors")


def _is_blob(base: str) -> bool:
    """Whether a file name in the parts folder is a part's (``<hex>.safetensors``) or an asset's (``<hex>``)."""
    return BLOB_FILE.match(base) is not None
