"""A client of the OCI distribution API with sepstore's transport rules: :class:`Registry`, whose
calls live by what they concern: the transport and authentication (:mod:`.transport`), blobs
(:mod:`.blobs`), and manifests, tags and referrers (:mod:`.manifests`)."""

from __future__ import annotations

from .blobs import UPLOAD_CHUNK, BlobCalls, Upload
from .manifests import DOCKER_MANIFEST, MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST, ManifestCalls
from .transport import RegistryTransientError, is_loopback

__all__ = [
    "DOCKER_MANIFEST",
    "MAX_MANIFEST_BYTES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "UPLOAD_CHUNK",
    "Registry",
    "RegistryTransientError",
    "Upload",
    "is_loopback",
]


class Registry(BlobCalls, ManifestCalls):
    """One OCI registry (``host[:port]``), its connections and its authentication state, shared by threads.

    ``credentials`` default to :func:`~sepstore.oci.auth.credentials_for`; ``insecure`` allows plain
    HTTP to a host that is not a loopback one (see :mod:`sepstore.oci.transport`).
    """
