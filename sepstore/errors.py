"""The exceptions sepstore raises: one root, a few precise subclasses."""

from __future__ import annotations

__all__ = [
    "DeciderError",
    "IntegrityError",
    "KeyFileError",
    "ManifestError",
    "ModuleMismatchError",
    "NotFoundError",
    "RefError",
    "RegistryAuthError",
    "RegistryError",
    "SepstoreError",
    "SpecError",
    "StoreError",
    "TensorError",
    "TrustError",
    "UnsupportedModelError",
]


class SepstoreError(Exception):
    """Base class of every error sepstore raises on purpose."""


class ManifestError(SepstoreError):
    """A manifest is malformed, of an unknown format, or too new for this sepstore."""


class SpecError(SepstoreError, ValueError):
    """A part spec such as ``"b 0-5 e"`` is malformed or out of range."""


class DeciderError(SepstoreError, ValueError):
    """A decider returned something that is not a placement for a state-dict key."""


class IntegrityError(SepstoreError):
    """Bytes do not match what the manifest promises (size, digest, or safetensors header)."""


class NotFoundError(SepstoreError, FileNotFoundError):
    """A manifest, part, store or layer that was asked for does not exist."""


class StoreError(SepstoreError):
    """The store cannot be read or written (permissions, conflicting content, backend failure)."""


class RefError(StoreError):
    """A model reference, or an option given with it, is malformed or cannot apply where it was given."""


class ModuleMismatchError(SepstoreError):
    """Tensors loaded from a store do not fit the module they are loaded into."""


class TensorError(SepstoreError, TypeError):
    """A state-dict value cannot be stored (not a tensor, or a dtype safetensors lacks)."""


class TrustError(SepstoreError):
    """A trust policy is in force and a manifest does not satisfy it: no valid signature by a key
    allowed for its name, a name, tag or parts location that disagrees, or a rolled-back tag."""


class KeyFileError(SepstoreError, ValueError):
    """A key or trust policy cannot be used: unreadable, malformed, or of an unsupported kind."""


class RegistryError(StoreError):
    """An OCI registry refused a request, or answered it outside the distribution spec."""


class RegistryAuthError(RegistryError, PermissionError):
    """An OCI registry wants credentials that were not given, or refused those that were."""


class UnsupportedModelError(SepstoreError):
    """A model :mod:`sepstore.hf` cannot run as slices: an unsupported family, or transformers is missing."""
