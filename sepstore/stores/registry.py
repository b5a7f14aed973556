"""An OCI registry repository as a store (``oci://HOST[:PORT]/REPOSITORY``), over :mod:`sepstore.oci`.

A repository holds one model: its tags are the model's tags, each an image manifest whose layers are
the parts and assets (annotated with their BLAKE3 digests) and the sepstore manifest. Blobs are found
by BLAKE3 through those annotations (and the uploads of this store object), and read by SHA-256 with
ranged GETs (:meth:`RegistryStore.open_blob_range`), each checked against its SHA-256 where read
whole. What a registry cannot do is a capability it lacks:

- no conditional writes: a tag is checked, then written (two publishers racing both succeed, the last wins);
- no listing of blobs (the distribution API has none), so sepstore's ``gc`` cannot find unreferenced
  blobs: delete a tag's image, then run the registry's own garbage collection
  (``registry garbage-collect``, or the hosted registry's retention policy);
- no server-side copy of ranges; whole blobs of another repository of the same registry are
  *mounted* (:meth:`RegistryStore.copy_blob_from`), which ``push`` tries before uploading;
- no lease objects: none are needed, as sepstore's ``gc`` deletes nothing here, and a registry
  refuses an image whose blobs are missing;
- one model per repository, as with ``docker push``: a manifest of another model is refused
  (:meth:`RegistryStore.check_publishable`), unless forced.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from typing import Any

from ..backends import RangeBody
from ..errors import IntegrityError, NotFoundError, RefError, RegistryError, SepstoreError, StoreError
from ..hashing import Hasher, digest_of
from ..manifest import Blob, decode_manifest
from ..oci.client import Registry
from ..oci.layout import (
    REGISTRY_OPTIONS,
    OciModel,
    OciRef,
    held_digest,
    image_of,
    put_image,
    refuse_another_model,
    registry_for,
    resolve_oci,
    sha256_of,
    tags_oci,
)
from ..oci.signatures import RegistrySignatures
from ..refs import Resolved
from ..store import check_name, check_tag
from .base import Store

__all__ = ["RegistryStore"]


class RegistryStore(Store):
    """The model in one registry repository (``oci://HOST[:PORT]/REPOSITORY``; ``storage_options``
    as for an ``oci://`` reference: ``insecure``, ``username``, ``password``)."""

    conditional_writes = False
    ranged_reads = True
    server_side_copy = False
    can_list = True  # its tags
    can_list_blobs = False  # the distribution API has no such call
    can_delete = True  # blobs, where the registry allows deletion (else a StoreError naming it)
    read_only = False

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        registry: Registry | None = None,
    ) -> None:
        ref = OciRef.parse(os.fspath(url))
        if ref.tag is not None or ref.digest is not None:
            raise StoreError(f"{ref.url}: a registry store is a repository (oci://HOST/REPOSITORY), without a tag")
        self.ref = ref
        self.url = ref.url
        self.registry = registry if registry is not None else registry_for(ref.host, storage_options)
        self._lock = threading.Lock()
        #: Where the repository holds each file: file name -> (sha256 digest, size), from its images and uploads.
        self._blobs: dict[str, tuple[str, int]] = {}
        self._indexed = False
        #: The images read, by reference URL (their signatures hang from them).
        self._models: dict[str, OciModel] = {}
        #: The image a resolved reference was read as, by its tag (see :meth:`of_resolved`).
        self._images: dict[str, OciModel] = {}
        #: Models this store object may write manifests of (checked, or forced: see check_publishable).
        self._admitted: set[str] = set()

    @classmethod
    def _publishing_into(
        cls, url: str | os.PathLike[str], storage_options: dict[str, Any] | None
    ) -> tuple[Store, str | None]:
        """``oci://HOST/REPOSITORY[:TAG]``: the repository, and the tag (a ``@sha256:`` pin is refused)."""
        ref = OciRef.parse(os.fspath(url))
        if ref.digest is not None:
            raise RefError(f"{ref.url}: push publishes under a tag; leave out the @sha256: pin")
        return cls(f"oci://{ref.host}/{ref.repository}", storage_options), ref.tag

    @classmethod
    def of_resolved(cls, resolved: Resolved) -> RegistryStore:
        """The repository a resolved ``oci://`` reference was read from: the store its parts were
        read through (a mirror's reference looks its image up again), bound to the image it was
        read as, so that a pinned image's signatures are its own."""
        ref = OciRef.parse(resolved.url)
        parts = resolved.parts
        if isinstance(parts, RegistryStore) and parts.ref == OciRef(ref.host, ref.repository):
            store = parts
        else:
            options = {k: v for k, v in resolved.storage_options.items() if k in REGISTRY_OPTIONS}
            store = cls(f"oci://{ref.host}/{ref.repository}", options)
        model = store.model(ref)
        if ref.tag is not None:
            with store._lock:
                store._images[ref.tag] = model
        return store

    @classmethod
    def holding(cls, model: OciModel) -> RegistryStore:
        """The repository ``model`` was read from, through its client, knowing where its blobs are."""
        store = cls(f"oci://{model.ref.host}/{model.ref.repository}", registry=model.registry)
        store._remember(model)
        return store

    def _remember(self, model: OciModel) -> OciModel:
        with self._lock:
            self._blobs.update(model.blobs)
            self._models[model.url] = model
        return model

    def model(self, ref: OciRef) -> OciModel:
        """The model version ``ref`` (of this repository) names, read once by this store object."""
        with self._lock:
            found = self._models.get(ref.url)
        return found if found is not None else self._remember(resolve_oci(ref, registry=self.registry))

    def resolved(self, model: OciModel, storage_options: Mapping[str, Any] | None = None) -> Resolved:
        """``model`` (read by this store) as every reading function takes it, its parts read from here."""
        return Resolved(model.data, model.url, self.parts_url, storage_options, parts=self)

    # -- locations -------------------------------------------------------------------------------

    def url_of(self, path: str) -> str:
        return f"{self.registry.base}/v2/{self.ref.repository}/blobs/{path}"

    @property
    def parts_url(self) -> str:
        return self.url

    def manifest_url(self, name: str, tag: str) -> str:
        check_name(name)
        return self.ref.with_tag(check_tag(tag)).url

    def blob_url(self, blob: Blob) -> str:
        found = self._find(blob)
        return self.url_of(found[0]) if found is not None else f"{self.url} ({blob.digest})"

    def require(self) -> None:
        try:
            self.registry.tags(self.ref.repository)
        except NotFoundError:
            raise NotFoundError(f"{self.url}: no such repository in the registry") from None

    # -- blobs -----------------------------------------------------------------------------------

    def _model(self, tag: str) -> OciModel:
        return self._remember(resolve_oci(self.ref.with_tag(check_tag(tag)), registry=self.registry))

    def _index(self) -> dict[str, tuple[str, int]]:
        """Where the repository holds each file: every tag's image is read once, when first needed."""
        with self._lock:
            indexed = self._indexed
        if not indexed:
            with contextlib.suppress(NotFoundError):  # no repository yet: no blobs
                for tag in self._tags():
                    with contextlib.suppress(SepstoreError):  # an image that is not a sepstore model holds none
                        self._model(tag)
        with self._lock:
            self._indexed = True
            return dict(self._blobs)

    def _find(self, blob: Blob) -> tuple[str, int] | None:
        with self._lock:
            found = self._blobs.get(blob.file_name)
        return found if found is not None else self._index().get(blob.file_name)

    def _tags(self) -> list[str]:
        return sorted(t for t in self.registry.tags(self.ref.repository) if not t.startswith("sha256-"))

    def blob_size(self, blob: Blob) -> int | None:
        found = self._find(blob)
        return None if found is None else self.registry.blob_size(self.ref.repository, found[0])

    def has_blob(self, blob: Blob) -> bool:
        return self.blob_size(blob) is not None

    def _located(self, blob: Blob) -> str:
        found = self._find(blob)
        if found is None:
            raise NotFoundError(f"{self.url}: no blob of {blob.digest} in the repository")
        return found[0]

    def open_blob_range(self, blob: Blob, start: int, end: int) -> RangeBody:
        """A ranged GET of the blob by its SHA-256 (see :meth:`Registry.open_blob`)."""
        return self.registry.open_blob(self.ref.repository, self._located(blob), start, end, blob.size)

    def extra_digests(self, blob: Blob) -> dict[str, str]:
        """The SHA-256 the registry names the blob by."""
        return {"sha256": self._located(blob)}

    def put_blob_file(self, path: str, blob: Blob, *, replace: bool = False) -> bool:
        """Upload the file as a blob, in one pass: its SHA-256 computed while it is sent, its BLAKE3
        and size checked on the way (a file that is not ``blob``'s is never filed: the upload is
        cancelled). Skipped when an image of the repository lists it, unless ``replace``; a blob the
        repository holds unlisted (an interrupted push) is sent again, and the registry keeps one copy.

        With ``replace`` (the repository's copy is damaged) the copy is re-hashed after the upload:
        a registry keeps the bytes it holds under a digest uploaded again, so a copy still damaged is
        deleted and uploaded once more, and if it is still damaged then (distribution stores a digest's
        bytes once for all repositories), an :class:`IntegrityError` says the registry's operator must remove it."""
        if not replace and self.has_blob(blob):
            return False

        def check(blake3: Any) -> None:
            if digest_of(blake3) != blob.digest:
                raise IntegrityError(f"{path}: digest {digest_of(blake3)}, the blob is {blob.digest}; not uploaded")

        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise StoreError(f"{path}: cannot read the file to upload ({exc})") from exc
        if size != blob.size:
            raise IntegrityError(f"{path}: {size} bytes, the blob is {blob.size} bytes of {blob.digest}; not uploaded")

        def upload() -> str:
            sha256 = self.registry.upload_new_blob(self.ref.repository, path, size, also=Hasher, check=check)
            with self._lock:
                self._blobs[blob.file_name] = (sha256, size)
            return sha256

        sha256 = upload()
        if not replace or self.intact(blob):
            return True
        try:
            self.remove_blob(blob)
        except StoreError as exc:
            why = f"deleting it was refused: {exc}"
        else:
            sha256 = upload()
            if self.intact(blob):
                return True
            why = "deleted and uploaded again, the registry keeps a digest's first bytes"
        raise IntegrityError(
            f"{self.url_of(sha256)}: the registry holds a damaged blob of {blob.digest} ({why}); "
            "its operator must remove the blob from the registry's storage, then push again"
        )

    def copy_blob_from(self, source: Store, blob: Blob) -> bool:
        """Mount the blob from ``source`` when it is another repository of the same registry that holds it."""
        if not isinstance(source, RegistryStore) or source.ref.host != self.ref.host or source.url == self.url:
            return False
        found = source._find(blob)
        if found is None or found[1] != blob.size:
            return False
        if not self.registry.mount_blob(self.ref.repository, found[0], source.ref.repository):
            return False
        with self._lock:
            self._blobs[blob.file_name] = found
        return True

    def list_blobs(self) -> list[dict[str, Any]]:
        raise self.lacks(
            "blob listing",
            "list its blobs (the distribution API has no such call), so gc cannot find unreferenced ones: "
            "delete the tags you no longer want and run the registry's own garbage collection "
            "(`registry garbage-collect`, or the hosted registry's retention policy)",
        )

    def entry(self, path: str) -> dict[str, Any] | None:
        size = self.registry.blob_size(self.ref.repository, path)
        return None if size is None else {"name": path, "size": size}

    def remove(self, path: str) -> None:
        """Delete the blob of SHA-256 ``path``; a :class:`StoreError` where the registry does not allow deletion."""
        try:
            self.registry.delete_blob(self.ref.repository, path)
        except NotFoundError:
            return
        except RegistryError as exc:
            raise StoreError(
                f"{self.url_of(path)}: the registry refused to delete it (deletion disabled?): {exc}"
            ) from exc

    def remove_blob(self, blob: Blob) -> None:
        found = self._find(blob)
        if found is not None:
            self.remove(found[0])
            with self._lock:
                self._blobs.pop(blob.file_name, None)

    # -- manifests -------------------------------------------------------------------------------

    def read_manifest_bytes(self, name: str, tag: str) -> bytes:
        """The manifest the tag's image carries; :class:`NotFoundError` if it holds another model."""
        model = self._model(tag)
        held = decode_manifest(model.data, source=model.url).name
        if held != check_name(name):
            raise NotFoundError(f"{model.url} holds model {held!r}, not {name!r} (a repository holds one model)")
        return model.data

    def check_publishable(self, name: str, *, force: bool = False) -> None:
        """A :class:`StoreError` when the repository's tags hold another model, unless ``force``."""
        if check_name(name) in self._admitted:
            return
        refuse_another_model(self.registry, self.ref, name, force=force)
        self._admitted.add(name)

    def write_manifest_bytes(
        self, name: str, tag: str, data: bytes, *, create: bool = False, if_version: str | None = None
    ) -> bool:
        """Publish the manifest as the tag's image (ModelPack's form, see :mod:`sepstore.oci.layout`):
        every part and asset must be in the repository already (:meth:`put_blob_file`). A model other
        than the one the repository holds is refused (:meth:`check_publishable`). With ``create``,
        only if the tag holds no image (checked, then written: a registry has no conditional write)."""
        oci = self.ref.with_tag(check_tag(tag))
        if decode_manifest(data, source=oci.url).name != check_name(name):
            raise StoreError(f"{oci.url}: the manifest is not of model {name!r}")
        self.check_publishable(name)
        config, image = image_of(data, oci, self._index())
        held = held_digest(self.registry, oci)
        if held == sha256_of(image) or (create and held is not None):
            return False
        digest = sha256_of(data)
        if self.registry.blob_size(oci.repository, digest) != len(data):
            self.registry.upload_blob(oci.repository, data, digest, len(data))
        put_image(self.registry, oci, config, image)
        with self._lock:
            self._images.pop(tag, None)  # the tag names this image now
        return True

    def has_manifest(self, name: str, tag: str) -> bool:
        try:
            self.read_manifest_bytes(name, tag)
        except NotFoundError:
            return False
        return True

    def manifest_entries(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every tag holding a sepstore model (an image of another kind is left out)."""
        rows = tags_oci(self.ref, registry=self.registry)
        return {(row.name, row.tag): {"name": row.url} for row in rows if row.error is None}

    # -- leases: none needed (see the module's docstring) ------------------------------------------

    def lease_url(self, lease_id: str) -> str:
        return f"{self.url} (no lease objects: sepstore's gc deletes nothing in a registry)"

    def put_lease(self, lease_id: str, data: bytes) -> None:
        pass

    def read_lease(self, lease_id: str) -> bytes | None:
        return None

    def list_leases(self) -> list[str]:
        return []

    def delete_lease(self, lease_id: str) -> None:
        pass

    # -- signatures: OCI referrers of the tag's image ----------------------------------------------

    def _signatures(self, name: str, tag: str) -> RegistrySignatures:
        with self._lock:
            model = self._images.get(tag)
        if model is None:  # else the image a reference was resolved as (a pinned one, maybe no longer tagged)
            self.read_manifest_bytes(name, tag)  # the tag holds that model
            model = self._model(tag)
        return RegistrySignatures.of_model(model)

    def signature_url(self, name: str, tag: str, key_id: str) -> str:
        return f"{self.manifest_url(name, tag)} (referrers, key {key_id})"

    def signatures_url(self, name: str, tag: str) -> str:
        return f"{self.manifest_url(name, tag)} (referrers)"

    def read_signature_bytes(self, name: str, tag: str, key_id: str) -> bytes:
        return self._signatures(name, tag).read_signature_bytes(name, tag, key_id)

    def write_signature_bytes(self, name: str, tag: str, key_id: str, data: bytes) -> None:
        self._signatures(name, tag).write_signature_bytes(name, tag, key_id, data)

    def list_signatures(self, name: str, tag: str) -> list[str]:
        return self._signatures(name, tag).list_signatures(name, tag)

    def signature_files(self) -> dict[str, tuple[str, str, str, dict[str, Any]]]:
        raise self.lacks("file listing", "list signature files (they are referrers of each image)")
