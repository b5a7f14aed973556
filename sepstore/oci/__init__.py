"""OCI registries as homes of sepstore models (ModelPack's layout): push, resolve, list tags, and
sign, through a bounded, authenticated distribution-API client. A resolved model's parts are read
from its repository through :class:`~sepstore.stores.registry.RegistryStore`.
"""

from __future__ import annotations

from .auth import Credentials
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
