"""verify: re-hash a model's parts and check each file's header and tensors against the manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import IntegrityError, NotFoundError
from .hashing import digest_buffer
from .load import select_parts
from .reader import PartReader
from .refs import Ref, Resolved, resolve
from .safetensors_io import raw_bytes

__all__ = ["PartCheck", "VerifyReport", "verify"]


@dataclass(frozen=True)
class PartCheck:
    part: str
    url: str
    size: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"part": self.part, "url": self.url, "size": self.size, "ok": self.ok, "error": self.error}


@dataclass(frozen=True)
class VerifyReport:
    manifest_url: str
    manifest_digest: str
    checks: list[PartCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[PartCheck]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest_url,
            "digest": self.manifest_digest,
            "ok": self.ok,
            "parts": [c.to_dict() for c in self.checks],
        }


def verify(
    ref: Ref | Resolved,
    spec: str = "f",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    parts_url: str | None = None,
    digest: str | None = None,
    name: str | None = None,
    tag: str | None = None,
) -> VerifyReport:
    """Check every part ``spec`` names: size, file digest, header, and each tensor's digest.

    Failures of parts are collected in the report (``report.ok``), not raised; a manifest that
    cannot be read or decoded still raises.
    """
    resolved = resolve(ref, name=name, tag=tag, storage_options=storage_options, parts_url=parts_url, digest=digest)
    parsed, chosen = select_parts(resolved.manifest, spec) if spec != "f" else (None, [])
    if parsed is None:  # the whole model: every part there is, also of a dump still in progress
        chosen = list(resolved.manifest.labelled_parts())
    reader = PartReader(resolved, cache_dir=cache_dir)
    checks: list[PartCheck] = []
    for label, part in chosen:
        url = resolved.part_url(part)
        try:
            tensors = reader.read(label, part, verify=True)
            for key, tensor in tensors.items():
                got, want = digest_buffer(raw_bytes(tensor)), part.tensors[key].digest
                if got != want:
                    raise IntegrityError(f"part {label} ({url}): tensor {key!r} digest is {got}, manifest says {want}")
        except (IntegrityError, NotFoundError) as exc:
            checks.append(PartCheck(label, url, part.size, str(exc)))
        else:
            checks.append(PartCheck(label, url, part.size))
    return VerifyReport(resolved.url, resolved.digest, checks)
