"""pull: bring the parts a spec needs into the local cache, verified, in parallel."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .cache import DEFAULT_WORKERS
from .reader import PartReader
from .refs import Ref, Resolved, resolve
from .spec import select_parts

__all__ = ["PullReport", "pull"]


@dataclass(frozen=True)
class PullReport:
    """What a pull did: parts fetched now, parts already there, and where each part's file is."""

    manifest_url: str
    manifest_digest: str
    fetched: list[str]
    fetched_bytes: int
    present_bytes: int
    paths: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest_url,
            "digest": self.manifest_digest,
            "fetched": self.fetched,
            "fetched_bytes": self.fetched_bytes,
            "present_bytes": self.present_bytes,
            "paths": self.paths,
        }


def pull(
    ref: Ref | Resolved,
    spec: str = "f",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    parts_url: str | None = None,
    digest: str | None = None,
    name: str | None = None,
    tag: str | None = None,
    workers: int = DEFAULT_WORKERS,
    quiet: bool = False,
) -> PullReport:
    """Fetch the parts ``spec`` names into the cache (``$SEPSTORE_CACHE``, default
    ``~/.cache/sepstore``), each verified before it gets its name; parts already cached are not
    fetched again, so moving a node from v1 to v2 fetches only the changed parts. A local store's
    parts are used where they are."""
    resolved = resolve(ref, name=name, tag=tag, storage_options=storage_options, parts_url=parts_url, digest=digest)
    _, chosen = select_parts(resolved.manifest, spec)
    reader = PartReader(resolved, cache_dir=cache_dir, workers=workers)
    fetched = reader.prefetch(chosen, desc=f"pull {resolved.manifest.name}", quiet=quiet)
    fetched_digests = {f.part.digest for f in fetched}
    sizes = {part.digest: part.size for _, part in chosen}
    return PullReport(
        manifest_url=resolved.url,
        manifest_digest=resolved.digest,
        fetched=[f.label for f in fetched],
        fetched_bytes=sum(f.part.size for f in fetched),
        present_bytes=sum(size for d, size in sizes.items() if d not in fetched_digests),
        paths={label: reader.path(part) for label, part in chosen},
    )
