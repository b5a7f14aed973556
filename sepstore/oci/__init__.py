"""OCI registries as homes of sepstore models (ModelPack's layout): push, resolve, list tags, and
sign, through a bounded, authenticated distribution-API client.

Importing this package registers the internal ``sepstore-oci://`` fsspec protocol through which the
cache reads a resolved model's parts from the registry (:mod:`sepstore.oci.blobs`).
"""

from __future__ import annotations

import fsspec

from .auth import Credentials
from .blobs import PROTOCOL, OciBlobFileSystem
from .client import Registry, Upload
from .layout import MODEL_ARTIFACT, OciModel, OciPushReport, OciRef, push_oci, resolve_oci, tags_oci
from .signatures import RegistrySignatures, attach_signature_oci, signatures_oci

__all__ = [
    "MODEL_ARTIFACT",
    "Credentials",
    "OciModel",
    "OciPushReport",
    "OciRef",
    "Registry",
    "RegistrySignatures",
    "Upload",
    "attach_signature_oci",
    "push_oci",
    "resolve_oci",
    "signatures_oci",
    "tags_oci",
]

fsspec.register_implementation(PROTOCOL, OciBlobFileSystem, clobber=True)
