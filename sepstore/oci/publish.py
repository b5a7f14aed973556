"""``push`` into an OCI registry: what :func:`sepstore.push` does when its destination is ``oci://HOST/REPOSITORY[:TAG]``."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from ..errors import RefError
from ..manifest import Blob, manifest_digest
from ..push import PushReport, _publishable
from ..reader import PartReader
from ..refs import Resolved
from ..sign import copy_signatures
from ..sign import sign as sign_manifest
from ..store import Store, check_tag
from ..stores.registry import RegistryStore
from ..trust import TrustReport
from .layout import OciRef, push_oci, refuse_another_model, registry_for, resolve_url

if TYPE_CHECKING:
    from ..signing import PrivateKey

__all__ = ["push_to_registry"]


def push_to_registry(
    src: Resolved,
    trusted: TrustReport | None,
    dest: str,
    *,
    dest_tag: str | None,
    force: bool,
    dest_storage_options: dict[str, Any] | None,
    workers: int,
    quiet: bool,
    verify: bool,
    signer: PrivateKey | None,
    cache_dir: str | os.PathLike[str] | None,
) -> PushReport:
    """Publish ``src`` into the registry repository ``dest`` under ``dest_tag``, else the
    reference's tag, else the source's. Every part and asset is checked (re-hashed) where it is
    local, fetched verified into the cache where it is not, then handed to
    :func:`~sepstore.oci.layout.push_oci`; the source's signatures of the manifest, and one by
    ``signer``, are pushed as referrers of the image."""
    if verify:
        raise RefError(
            "push(verify=True) re-hashes what a store holds; a registry names its blobs by SHA-256 and checks "
            "them on upload, and sepstore checks every byte against its BLAKE3 when it reads them: leave verify out"
        )
    oci = OciRef.parse(dest)
    if oci.digest is not None:
        raise RefError(f"{dest}: push publishes under a tag; leave out the @sha256: pin")
    if dest_tag is not None and oci.tag is not None and dest_tag != oci.tag:
        raise RefError(f"{dest}: --as-tag {dest_tag!r} contradicts the reference's tag {oci.tag!r}")
    tag = check_tag(dest_tag or oci.tag or src.tag)
    data = _publishable(src)
    manifest = src.manifest
    registry = registry_for(oci.host, dest_storage_options)
    refuse_another_model(registry, oci, manifest.name, force=force)  # before fetching what it would push
    chosen: list[tuple[str, Blob]] = [*manifest.labelled_parts(), *manifest.labelled_assets()]
    reader = PartReader(src, cache_dir=cache_dir, workers=workers)
    reader.recheck(chosen, rehash=True)  # a damaged cached copy is fetched again, a local one refused
    reader.prefetch(chosen, desc=f"fetch {manifest.name}", quiet=quiet)
    # a source in another repository of the same registry: its blobs are mounted, not uploaded again
    source = src.parts
    mount_from = source.ref.repository if isinstance(source, RegistryStore) and source.ref.host == oci.host else None
    with contextlib.ExitStack() as held:
        if reader.cache is not None:  # cached copies are read under their locks, so `cache prune` leaves them
            for _, blob in chosen:
                held.enter_context(reader.cache.reading(blob))
        report = push_oci(
            data, reader.path, oci, tag=tag, registry=registry, mount_from=mount_from, force=force, workers=workers
        )
    published = resolve_url(report.url, storage_options=dest_storage_options)
    digest = manifest_digest(data)
    repository = Store(f"oci://{oci.host}/{oci.repository}", dest_storage_options)  # a RegistryStore
    signed = copy_signatures(src, trusted, repository, tag, digest)
    if signer is not None:
        signed.append(sign_manifest(published, key=signer).key_id)
    return PushReport(
        manifest_url=report.url,
        manifest_digest=digest,
        uploaded=report.uploaded,
        uploaded_bytes=report.uploaded_bytes,
        transferred_bytes=report.uploaded_bytes,  # a registry takes whole blobs: what is uploaded is sent
        skipped=report.present + report.mounted,
        skipped_bytes=report.present_bytes + report.mounted_bytes,
        manifest_written=report.manifest_written,
        repaired=[],  # what a store push re-uploads over damaged copies; a registry's blobs are named by content
        verified=False,
        signatures=sorted(set(signed)),
    )
