"""sepstore: LLM weights as a content-addressed sepweight store.

A model's state dict is split into ``begin``, one ``mid`` part per layer and ``end``; each part
is a safetensors file named by its BLAKE3 digest, listed by a manifest. Nodes load just the parts
they run, from local disk or any fsspec URL, every byte verified.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__
from .assets import assets
from .cache_admin import CachedFile, CacheListing, CacheVerifyReport, PruneReport, cache_ls, cache_prune, cache_verify
from .convert import convert
from .diff import ManifestDiff, PartDiff, TensorChanges, diff
from .dump import Decider, Placement, dump
from .errors import (
    DeciderError,
    IntegrityError,
    KeyFileError,
    ManifestError,
    ModuleMismatchError,
    NotFoundError,
    RefError,
    RegistryAuthError,
    RegistryError,
    SepstoreError,
    SpecError,
    StoreError,
    TensorError,
    TrustError,
    UnsupportedModelError,
)
from .export import ExportReport, export
from .gc import GcReport, gc
from .load import LoadResult, PartStateDict, lazy_load, load, read_manifest
from .manifest import Asset, Manifest, Tensor
from .manifest import Part as ManifestPart
from .plan import NodePlan, plan
from .pull import PartFile, PullReport, files, pull
from .push import PushReport, push
from .refs import ModelRef, RefLike, RefOptions, Resolved, resolve
from .sign import SignReport, sign, signatures
from .signing import keygen
from .spec import PartSpec
from .store import Store
from .tags import TagInfo, tags
from .trust import SignatureCheck, TrustedKey, TrustPolicy, TrustReport
from .verify import PartCheck, VerifyReport, verify

if TYPE_CHECKING:
    from .module import Part

__all__ = [
    "Asset",
    "CacheListing",
    "CacheVerifyReport",
    "CachedFile",
    "Decider",
    "DeciderError",
    "ExportReport",
    "GcReport",
    "IntegrityError",
    "KeyFileError",
    "LoadResult",
    "Manifest",
    "ManifestDiff",
    "ManifestError",
    "ManifestPart",
    "ModelRef",
    "ModuleMismatchError",
    "NodePlan",
    "NotFoundError",
    "Part",
    "PartCheck",
    "PartDiff",
    "PartFile",
    "PartSpec",
    "PartStateDict",
    "Placement",
    "PruneReport",
    "PullReport",
    "PushReport",
    "RefError",
    "RefLike",
    "RefOptions",
    "RegistryAuthError",
    "RegistryError",
    "Resolved",
    "SepstoreError",
    "SignReport",
    "SignatureCheck",
    "SpecError",
    "Store",
    "StoreError",
    "TagInfo",
    "Tensor",
    "TensorChanges",
    "TensorError",
    "TrustError",
    "TrustPolicy",
    "TrustReport",
    "TrustedKey",
    "UnsupportedModelError",
    "VerifyReport",
    "__version__",
    "assets",
    "cache_ls",
    "cache_prune",
    "cache_verify",
    "convert",
    "diff",
    "dump",
    "export",
    "files",
    "gc",
    "keygen",
    "lazy_load",
    "load",
    "plan",
    "pull",
    "push",
    "read_manifest",
    "resolve",
    "sign",
    "signatures",
    "tags",
    "verify",
]


def __getattr__(name: str) -> object:
    """``sepstore.Part`` is an ``nn.Module``: torch is imported when it is first asked for, so that
    ``import sepstore`` (and every command that builds no tensor) stays free of torch."""
    if name == "Part":
        from .module import Part

        return Part
    raise AttributeError(f"module 'sepstore' has no attribute {name!r}")
