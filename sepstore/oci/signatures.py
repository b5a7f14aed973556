"""Signatures of a model in a registry, as OCI referrers of its image.

A signature (a Sigstore bundle, :data:`~sepstore.signing.BUNDLE_MEDIA_TYPE`) is the one layer of
an artifact manifest whose ``subject`` is the image and whose ``org.sepstore.key-id`` annotation
names the key; it is found through the referrers API, or, where a registry lacks it, through the
image index tagged ``sha256-<hex of the image digest>`` (the referrers tag schema).
"""

from __future__ import annotations

import io
import json
from typing import Any, Final

from ..errors import ManifestError, NotFoundError
from ..signing import BUNDLE_MEDIA_TYPE
from .client import OCI_INDEX, OCI_MANIFEST, Registry
from .layout import OciModel, json_object, layer_descriptors, sha256_of

__all__ = ["KEY_ID", "RegistrySignatures", "attach_signature_oci", "signatures_oci"]

KEY_ID: Final = "org.sepstore.key-id"
EMPTY: Final = "application/vnd.oci.empty.v1+json"
#: Signature bundles larger than this are not read.
_MAX_SIGNATURE_BYTES = 1024 * 1024


def _fallback_tag(digest: str) -> str:
    return digest.replace(":", "-")


class RegistrySignatures:
    """The signatures of one image (``subject``: its digest and size) in ``repository``, as OCI
    referrers, behind the part of :class:`~sepstore.store.Store`'s interface that signing, trust
    and ``push`` use (``name`` and ``tag`` are the image's own, and so are not needed to find them)."""

    def __init__(self, registry: Registry, url: str, repository: str, subject: tuple[str, int]) -> None:
        self.registry, self.url, self.repository, self.subject = registry, url, repository, subject

    @classmethod
    def of_model(cls, model: OciModel) -> RegistrySignatures:
        return cls(model.registry, model.url, model.ref.repository, model.subject)

    def signature_path(self, name: str, tag: str, key_id: str) -> str:
        return key_id

    def signatures_dir(self, name: str, tag: str) -> str:
        return ""

    def url_of(self, path: str) -> str:
        return f"{self.url} (referrers of {self.subject[0]}{f', key {path}' if path else ''})"

    def _index(self) -> list[dict[str, Any]]:
        """Descriptors of the image's referrers: from the referrers API, else the tag schema's index."""
        client, repo, digest = self.registry, self.repository, self.subject[0]
        found = client.referrers(repo, digest, BUNDLE_MEDIA_TYPE)
        if found is not None:
            return found
        try:
            index = client.get_manifest(repo, _fallback_tag(digest), accept=(OCI_INDEX,))[0]
        except NotFoundError:
            return []
        return _descriptors_of(index, self.url)

    def _bundles(self) -> dict[str, str]:
        """The signature manifests' digests by key id."""
        return {
            entry["annotations"][KEY_ID]: entry["digest"]
            for entry in self._index()
            if entry.get("artifactType") == BUNDLE_MEDIA_TYPE
            and isinstance(entry.get("digest"), str)
            and isinstance((entry.get("annotations") or {}).get(KEY_ID), str)
        }

    def list_signatures(self, name: str, tag: str) -> list[str]:
        return sorted(self._bundles())

    def read_signature_bytes(self, name: str, tag: str, key_id: str) -> bytes:
        digest = self._bundles().get(key_id)
        if digest is None:
            raise NotFoundError(f"{self.url_of(key_id)}: no signature by that key")
        data, _, _ = self.registry.get_manifest(self.repository, digest)
        layers = layer_descriptors(json_object(data, self.url), self.url)
        if not layers or layers[0]["size"] > _MAX_SIGNATURE_BYTES:
            raise ManifestError(f"{self.url_of(key_id)}: the signature manifest holds no bundle of a sane size")
        buffer = io.BytesIO()
        size = layers[0]["size"]
        self.registry.download_blob(self.repository, layers[0]["digest"], size, buffer.write, what="the signature")
        return buffer.getvalue()

    def write_signature_bytes(self, name: str, tag: str, key_id: str, data: bytes) -> None:
        """Push a signature bundle as a referrer of the image (an artifact manifest of type
        :data:`~sepstore.signing.BUNDLE_MEDIA_TYPE` whose ``subject`` is the image), replacing that
        key's earlier one in the tag schema's index where the registry lacks the referrers API."""
        client, repo = self.registry, self.repository
        empty = b"{}"
        for blob in (empty, data):
            digest = sha256_of(blob)
            if client.blob_size(repo, digest) != len(blob):
                client.upload_blob(repo, blob, digest, len(blob))
        body = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": BUNDLE_MEDIA_TYPE,
            "config": {"mediaType": EMPTY, "digest": sha256_of(empty), "size": len(empty)},
            "layers": [{"mediaType": BUNDLE_MEDIA_TYPE, "digest": sha256_of(data), "size": len(data)}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": self.subject[0], "size": self.subject[1]},
            "annotations": {KEY_ID: key_id},
        }
        manifest = json.dumps(body, separators=(",", ":")).encode()
        digest, indexed = client.put_manifest(repo, sha256_of(manifest), manifest, OCI_MANIFEST)
        if indexed or client.referrers(repo, self.subject[0]) is not None:
            return
        tag_ = _fallback_tag(self.subject[0])
        try:
            held = _descriptors_of(client.get_manifest(repo, tag_, accept=(OCI_INDEX,))[0], self.url)
        except NotFoundError:
            held = []
        kept = [d for d in held if (d.get("annotations") or {}).get(KEY_ID) != key_id]
        entry = {
            "mediaType": OCI_MANIFEST,
            "digest": digest,
            "size": len(manifest),
            "artifactType": BUNDLE_MEDIA_TYPE,
            "annotations": {KEY_ID: key_id},
        }
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*kept, entry]}
        client.put_manifest(repo, tag_, json.dumps(index, separators=(",", ":")).encode(), OCI_INDEX)


def _descriptors_of(data: bytes, url: str) -> list[dict[str, Any]]:
    body = json_object(data, url)
    manifests = body.get("manifests") or []
    if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        raise ManifestError(f"{url}: the referrers index's `manifests` is not a list of descriptors")
    return manifests


def attach_signature_oci(model: OciModel, key_id: str, bundle: bytes) -> None:
    """Publish a signature bundle of ``model``'s manifest as a referrer of its image
    (see :meth:`RegistrySignatures.write_signature_bytes`)."""
    RegistrySignatures.of_model(model).write_signature_bytes(model.ref.repository, model.ref.tag or "", key_id, bundle)


def signatures_oci(model: OciModel) -> dict[str, bytes]:
    """The signature bundles of ``model``'s image by key id, unverified (a trust policy checks them)."""
    shelf = RegistrySignatures.of_model(model)
    return {kid: shelf.read_signature_bytes("", "", kid) for kid in shelf.list_signatures("", "")}
