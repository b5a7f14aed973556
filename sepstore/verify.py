"""verify: re-hash a model's parts (and assets) and check each part's header and tensors against the manifest."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import IntegrityError, NotFoundError
from .manifest import Asset, Part
from .progress import progress
from .reader import PartReader
from .refs import FETCH_OPTIONS, RefLike, RefOptions, open_checked
from .spec import select_parts
from .trust import TrustReport, inspect

if TYPE_CHECKING:
    from typing_extensions import Unpack

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
    #: The tag's signatures: checked against the trust policy when one is in force, else only read.
    signatures: TrustReport | None = None

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
            "trust": self.signatures.to_dict() if self.signatures is not None else None,
        }


def verify(ref: RefLike, spec: str = "f", *, quiet: bool = False, **options: Unpack[RefOptions]) -> VerifyReport:
    """Check every part ``spec`` names: size, file digest, header, and each tensor's digest; with
    ``spec="f"``, every asset's size and digest too (labelled ``asset:<path>`` in the report).

    A remote store's parts are fetched into a temporary folder, so what is checked is what the
    server holds (pass ``cache_dir`` to check, and fill, a cache instead). Failures of parts are
    collected in the report (``report.ok``), not raised; a manifest that cannot be read or decoded,
    or a server that cannot be reached, still raises. ``ref`` and the options are as for
    :func:`sepstore.load`; with a trust policy, a manifest that does not satisfy it raises
    :class:`~sepstore.TrustError` before any part is read.
    """
    resolved, trusted = open_checked("verify", ref, options, FETCH_OPTIONS, report_all=True)
    cache_dir = options.get("cache_dir")
    # "f" checks every part there is, also of a dump still in progress (which "f" cannot load)
    chosen = list(resolved.manifest.labelled_parts()) if spec == "f" else select_parts(resolved.manifest, spec)[1]
    assets = list(resolved.manifest.labelled_assets()) if spec == "f" else []
    with tempfile.TemporaryDirectory(prefix="sepstore-verify-") as scratch:
        reader = PartReader(resolved, cache_dir=cache_dir if cache_dir is not None else scratch)
        checks = []
        total = sum(p.size for _, p in chosen) + sum(a.size for _, a in assets)
        with progress(total, f"verify {resolved.manifest.name}", quiet=quiet) as bar:
            for label, part in chosen:
                checks.append(_check(reader, label, part))
                bar.update(part.size)
            for label, asset in assets:
                checks.append(_check_asset(reader, label, asset))
                bar.update(asset.size)
    return VerifyReport(resolved.url, resolved.digest, checks, trusted if trusted is not None else inspect(resolved))


def _check(reader: PartReader, label: str, part: Part) -> PartCheck:
    url = reader.resolved.part_url(part)
    try:
        reader.check(label, part)
    except (IntegrityError, NotFoundError) as exc:
        return PartCheck(label, url, part.size, str(exc))
    return PartCheck(label, url, part.size)


def _check_asset(reader: PartReader, label: str, asset: Asset) -> PartCheck:
    """An asset's size and digest: re-hashed where it is local, else fetched (and so checked)."""
    url = reader.resolved.part_url(asset)
    try:
        reader.recheck([(label, asset)], rehash=True)
        reader.prefetch([(label, asset)], quiet=True)
    except (IntegrityError, NotFoundError) as exc:
        return PartCheck(label, url, asset.size, str(exc))
    return PartCheck(label, url, asset.size)
