"""OCI registries as homes of sepstore models (ModelPack's layout): resolve, list tags and sign
(``push`` publishes, and a resolved model's parts are read, through
:class:`~sepstore.stores.registry.RegistryStore`), through a bounded, authenticated
distribution-API client.
"""

from __future__ import annotations

from .auth import Credentials
from .client import Registry, Upload
from .layout import MODEL_ARTIFACT, OciModel, OciRef, resolve_oci, tags_oci
from .signatures import RegistrySignatures, attach_signature_oci, signatures_oci

__all__ = [
    "MODEL_ARTIFACT",
    "Credentials",
    "OciModel",
    "OciRef",
    "Registry",
    "RegistrySignatures",
    "Upload",
    "attach_signature_oci",
    "resolve_oci",
    "signatures_oci",
    "tags_oci",
]
