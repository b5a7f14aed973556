"""pull: bring the parts a spec needs into the local cache, verified, in parallel; files: where
they are, for other download tools."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .cache import DEFAULT_WORKERS
from .manifest import Blob
from .reader import PartReader
from .refs import FETCH_OPTIONS, PARTS_OPTIONS, RefLike, RefOptions, open_ref
from .spec import select_parts

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["PartFile", "PullReport", "files", "pull"]


@dataclass(frozen=True)
class PullReport:
    """What a pull did, and exactly what it checked.

    Assets count as parts here, labelled ``asset:<path>``; those already local are always
    re-hashed (they are small), whatever ``checked`` says of the parts. ``fetched`` parts were
    downloaded now, each checked for size and BLAKE3 digest before it got its name in the cache.
    ``present`` parts were already local (cached, or in a local store): ``checked`` says how they
    were checked now, ``"size"`` or (with ``verify=True``) ``"digest"``, re-hashed. ``repaired``
    names the local copies that failed that check, with what was wrong; they were deleted and
    fetched again (so they are among ``fetched`` too). Of the ``fetched_bytes``,
    ``transferred_bytes`` crossed the network and ``reused_bytes`` were copied from tensors
    already cached (a part assembled by :mod:`sepstore.delta`); a part fetched whole counts whole.
    """

    manifest_url: str
    manifest_digest: str
    fetched: list[str]
    fetched_bytes: int
    present: list[str]
    present_bytes: int
    checked: Literal["size", "digest"]
    repaired: dict[str, str]
    paths: dict[str, str]
    transferred_bytes: int = 0
    reused_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest_url,
            "digest": self.manifest_digest,
            "fetched": self.fetched,
            "fetched_bytes": self.fetched_bytes,
            "transferred_bytes": self.transferred_bytes,
            "reused_bytes": self.reused_bytes,
            "present": self.present,
            "present_bytes": self.present_bytes,
            "present_checked": self.checked,
            "repaired": self.repaired,
            "paths": self.paths,
        }


def pull(
    ref: RefLike,
    spec: str = "f",
    *,
    workers: int = DEFAULT_WORKERS,
    quiet: bool = False,
    verify: bool = False,
    **options: Unpack[RefOptions],
) -> PullReport:
    """Fetch the parts ``spec`` names into the cache (``$SEPSTORE_CACHE``, default
    ``~/.cache/sepstore``), each verified before it gets its name; parts already cached are not
    fetched again, so moving a node from v1 to v2 fetches only the changed parts. A local store's
    parts are used where they are. ``ref`` and the options are as for :func:`sepstore.load`.

    Parts already local get their size checked, and with ``verify`` their digest (every byte
    re-hashed); a cached copy that fails is fetched again, a local store's part that fails is an
    :class:`~sepstore.errors.IntegrityError`. The model's assets (format version 2) are fetched
    and checked with the parts, whatever ``spec`` says."""
    resolved = open_ref("pull", ref, options, FETCH_OPTIONS)
    _, parts = select_parts(resolved.manifest, spec)
    assets = list(resolved.manifest.labelled_assets())
    chosen: list[tuple[str, Blob]] = [*parts, *assets]
    reader = PartReader(resolved, cache_dir=options.get("cache_dir"), workers=workers)
    repaired = {**reader.recheck(parts, rehash=verify), **reader.recheck(assets, rehash=True)}
    fetched = reader.prefetch(chosen, desc=f"pull {resolved.manifest.name}", quiet=quiet)
    fetched_files = {f.part.file_name for f in fetched}
    present = {part.file_name: (label, part) for label, part in chosen if part.file_name not in fetched_files}
    return PullReport(
        manifest_url=resolved.url,
        manifest_digest=resolved.digest,
        fetched=[f.label for f in fetched],
        fetched_bytes=sum(f.part.size for f in fetched),
        present=[label for label, _ in present.values()],
        present_bytes=sum(part.size for _, part in present.values()),
        checked="digest" if verify else "size",
        repaired=repaired,
        paths={label: reader.path(part) for label, part in chosen},
        transferred_bytes=reader.transfer.transferred,
        reused_bytes=reader.transfer.reused,
    )


@dataclass(frozen=True)
class PartFile:
    """Where one part's file is, and what it must be."""

    part: str
    url: str
    digest: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"part": self.part, "url": self.url, "digest": self.digest, "size": self.size}


def files(ref: RefLike, spec: str = "f", **options: Unpack[RefOptions]) -> list[PartFile]:
    """The part files ``spec`` names, and the asset files (labelled ``asset:<path>``, as ``pull``
    fetches them whatever the spec), with their URLs (``parts_url`` applied), digests and sizes,
    for tools that download by URL; nothing is fetched, so ``cache_dir`` does not apply."""
    resolved = open_ref("files", ref, options, PARTS_OPTIONS)
    _, parts = select_parts(resolved.manifest, spec)
    chosen: list[tuple[str, Blob]] = [*parts, *resolved.manifest.labelled_assets()]
    return [PartFile(label, resolved.part_url(blob), blob.digest, blob.size) for label, blob in chosen]
