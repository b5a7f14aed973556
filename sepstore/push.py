"""push: publish a model version to another store, uploading only the parts it lacks."""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from .cache import DEFAULT_WORKERS
from .compose import Composed, Composer
from .errors import RefError, StoreError
from .leases import holding
from .manifest import Blob, decode_manifest, encode_manifest, manifest_digest
from .progress import progress
from .reader import PartReader
from .refs import FETCH_OPTIONS, RefLike, RefOptions, Resolved, open_checked
from .sign import copy_signatures, private_key, sign_into
from .store import Store, check_tag, standard_parts_location
from .trust import published_as, store_of

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .signing import PrivateKey

__all__ = ["PushReport", "push"]


@dataclass(frozen=True)
class PushReport:
    """What a push did: parts (and assets, labelled ``asset:<path>``) uploaded, those the
    destination already had (checked by size, or re-hashed when ``verified``), those of them found
    damaged and uploaded again (``repaired``, also in ``uploaded``), and the manifest. Of the
    ``uploaded_bytes``, ``transferred_bytes`` were sent and ``copied_bytes`` copied inside the
    storage: ranges of part objects the destination held (S3, see :mod:`sepstore.compose`), and the
    files in ``copied``, filed whole from the source's copy (a registry's cross-repository mount,
    see :meth:`~sepstore.stores.base.Store.copy_blob_from`)."""

    manifest_url: str
    manifest_digest: str
    uploaded: list[str]
    uploaded_bytes: int
    skipped: list[str]
    skipped_bytes: int
    manifest_written: bool
    repaired: list[str]
    verified: bool
    #: Ids of the keys whose signatures of this manifest were copied or made (``sign=``) here.
    signatures: list[str]
    transferred_bytes: int = 0
    copied_bytes: int = 0
    copied: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest_url,
            "digest": self.manifest_digest,
            "uploaded": self.uploaded,
            "uploaded_bytes": self.uploaded_bytes,
            "transferred_bytes": self.transferred_bytes,
            "copied_bytes": self.copied_bytes,
            "copied": self.copied,
            "skipped": self.skipped,
            "skipped_bytes": self.skipped_bytes,
            "repaired": self.repaired,
            "verified": self.verified,
            "manifest_written": self.manifest_written,
            "signatures": self.signatures,
        }


def _publishable(resolved: Resolved) -> bytes:
    """The manifest bytes to publish: as read (so its digest is kept) unless its parts location
    is not the standard relative one, which a store copy needs."""
    manifest = resolved.manifest
    standard = standard_parts_location(manifest.name)
    if manifest.parts == standard and resolved.data:
        return resolved.data
    return encode_manifest(msgspec.structs.replace(manifest, parts=standard))


def push(
    ref: RefLike,
    dest: str | os.PathLike[str],
    *,
    dest_tag: str | None = None,
    force: bool = False,
    dest_storage_options: dict[str, Any] | None = None,
    workers: int = DEFAULT_WORKERS,
    quiet: bool = False,
    verify: bool = False,
    sign: str | os.PathLike[str] | PrivateKey | None = None,
    **options: Unpack[RefOptions],
) -> PushReport:
    """Publish the model at ``ref`` into the store ``dest`` (a path or any fsspec URL), or into an OCI
    registry repository (``oci://HOST/REPOSITORY[:TAG]``, see :mod:`sepstore.stores.registry`).

    Parts the destination already has with the right size are skipped (dedup across versions
    and models); with ``verify``, they are re-hashed too (fetched, from a remote store). A part the
    destination can file from the source's own copy inside the storage (a registry mounts a blob of
    another of its repositories, S3 copies an object of the same endpoint) is copied so, unread
    (re-hashed with ``verify``). Every other part, and every one found damaged, is verified against
    the manifest before it is uploaded, and the manifest is written last, after checking once more
    that every part is there. A lease keeps ``gc`` from removing the parts this push relies on while
    it runs. A tag that already holds a different manifest, or a destination that may not hold this
    model (a registry repository holding another one), is refused before anything is uploaded,
    unless ``force``.
    ``dest_tag`` publishes under another tag (default: the source's). ``ref`` and the options are
    as for :func:`sepstore.load`: they pick, pin and read the source. The source's signatures of
    the manifest published are copied along; ``sign`` (a private key) signs it on the way.
    """
    src, trusted = open_checked("push", ref, options, FETCH_OPTIONS)
    signer = private_key(sign) if sign is not None else None  # an unusable key is refused before any upload
    store, named_tag = Store.destination(dest, dest_storage_options)
    if dest_tag is not None and named_tag is not None and dest_tag != named_tag:
        raise RefError(f"{dest}: --as-tag {dest_tag!r} contradicts the destination's tag {named_tag!r}")
    manifest = src.manifest
    out_tag = check_tag(dest_tag or named_tag or src.tag)
    url = store.manifest_url(manifest.name, out_tag)
    store.check_publishable(manifest.name, force=force)  # before anything is fetched or uploaded
    data = _publishable(src)
    digest = manifest_digest(data)
    held = None
    if store.has_manifest(manifest.name, out_tag):
        held = manifest_digest(store.read_manifest_bytes(manifest.name, out_tag))
        if held != digest and not force:
            raise StoreError(
                f"{url} already holds another manifest ({held}, pushing {digest}); "
                "pass force=True (CLI: --force) to replace it, or push under another tag"
            )
    # Every file to copy, parts and assets, by its file name in the store.
    parts: dict[str, tuple[str, Blob]] = {}
    for label, part in manifest.labelled_parts():
        parts.setdefault(part.file_name, (label, part))
    for label, asset in manifest.labelled_assets():
        parts.setdefault(asset.file_name, (label, asset))
    reader = PartReader(src, cache_dir=options.get("cache_dir"), workers=workers)

    damaged: set[str] = set()  # files the destination holds with other bytes
    composer = Composer.for_store(store, manifest, workers=workers) if store.server_side_copy else None
    moved = {"sent": 0, "copied": 0}  # bytes uploaded, and copied server-side instead

    def upload(item: tuple[str, Blob]) -> Composed:
        """Upload one part: composed from server-side copies where it can be, else whole."""
        _, part = item
        # a cached copy is read under its lock, so that `cache prune` leaves it alone meanwhile
        with reader.cache.reading(part) if reader.cache is not None else contextlib.nullcontext():
            composed = composer.put(reader.path(part), part) if composer is not None else Composed(False)
            if not composed.done:
                replace = part.file_name in damaged or composed.tried
                store.put_blob_file(reader.path(part), part, replace=replace)
                composed.sent += part.size
        return composed

    def held_as(file_name: str) -> Literal["missing", "damaged", "whole"]:
        """What the destination holds under that name: checked by size, and re-hashed with ``verify``."""
        blob = parts[file_name][1]
        size = store.blob_size(blob)
        if size is None:
            return "missing"
        if size != blob.size or (verify and not store.intact(blob)):
            return "damaged"
        return "whole"

    def send(todo: list[tuple[str, Blob]], desc: str) -> None:
        # What is already on local disk (a local store, or the cache) is re-hashed first: a damaged
        # cached copy is fetched again, a damaged local part refused, never uploaded under its digest.
        reader.recheck(todo, rehash=True)
        reader.prefetch(todo, desc=f"fetch {manifest.name}", quiet=quiet)  # a remote source: verified into the cache
        with progress(sum(p.size for _, p in todo), desc, quiet=quiet) as bar:  # counts the bytes sent
            for (_, part), composed in zip(todo, pool.map(upload, todo), strict=True):
                bar.total += composed.sent + composed.copied - part.size
                bar.update(composed.sent)
                moved["sent"] += composed.sent
                moved["copied"] += composed.copied

    with (
        holding(store, "publish", (blob.digest for _, blob in parts.values())) as lease,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sepstore-push") as pool,
    ):
        state = dict(zip(parts, pool.map(held_as, parts), strict=True))
        damaged.update(d for d, there in state.items() if there == "damaged")
        todo = [parts[d] for d, there in state.items() if there != "whole"]
        missing = [parts[d] for d, there in state.items() if there == "missing"]
        # filed from the source's own copy inside the storage where the destination can (a registry's mount)
        where = published_as(src) if missing else None
        source = store_of(where, src) if where is not None else None
        done = pool.map(lambda item: source is not None and store.copy_blob_from(source, item[1]), missing)
        mounted = [item for item, copied in zip(missing, done, strict=True) if copied]
        if verify:  # a copy is the source's, unread here: re-hashed like all the destination holds
            whole = pool.map(lambda item: store.intact(item[1]), mounted)
            damaged.update(item[1].file_name for item, ok in zip(mounted, whole, strict=True) if not ok)
            mounted = [item for item in mounted if item[1].file_name not in damaged]
        filed = {blob.file_name for _, blob in mounted}
        send([item for item in todo if item[1].file_name not in filed], f"push {manifest.name}:{out_tag}")
        # Belt and braces (a gc of an older sepstore ignores leases): every part, right before the manifest.
        vanished = [item for item in parts.values() if not store.has_blob(item[1])]
        if vanished:
            send(vanished, f"push {manifest.name}:{out_tag} again")
        lease.check()
        written = held != digest
        if written and not store.write_manifest_bytes(manifest.name, out_tag, data, create=not force):
            # another publisher created the tag since we looked: keep theirs unless it is this very manifest
            held = manifest_digest(store.read_manifest_bytes(manifest.name, out_tag))
            if held != digest:
                raise StoreError(
                    f"{url} was published by someone else during this push ({held}); its parts are uploaded, "
                    "push again under another tag, or pass force=True (CLI: --force) to replace it"
                )
            written = False
    skipped = [parts[d] for d, there in state.items() if there == "whole"]
    signed = copy_signatures(src, trusted, store, out_tag, digest)
    if signer is not None:
        signed.append(sign_into(store, out_tag, decode_manifest(data, source=url), digest, signer).key_id)
    return PushReport(
        manifest_url=url,
        manifest_digest=digest,
        uploaded=[label for label, _ in todo],
        uploaded_bytes=sum(p.size for _, p in todo),
        skipped=[label for label, _ in skipped],
        skipped_bytes=sum(p.size for _, p in skipped),
        manifest_written=written,
        repaired=[parts[d][0] for d in parts if d in damaged],
        verified=verify,
        signatures=sorted(set(signed)),
        transferred_bytes=moved["sent"],
        copied_bytes=moved["copied"] + sum(p.size for _, p in mounted),
        copied=[label for label, _ in mounted],
    )
