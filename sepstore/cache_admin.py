"""Managing the local cache: what it holds, re-hashing it, and pruning it to a size.

**Last use.** A file's time of last use is its modification time. The cache sets it when it
fetches a part and each time sepstore reads one (``os.utime``, see
:meth:`~sepstore.cache.Cache.reading`): a part file's bytes never change, so its modification
time is free to mean "last used". Access times are not used: most filesystems are mounted
``relatime`` (the access time moves at most once a day) or ``noatime`` (never), and anything that
reads every file (``cache verify``, a backup, a virus scan) would make every part look just used.
A program that reads cached files directly (paths from ``sepstore files``) does not mark them.

**In use.** A process reading a cached part holds the part's lock (``incoming/<hex>.lock``) shared
while it reads; a process fetching it holds it exclusively. ``prune`` takes it exclusively without
waiting and leaves the part alone when it cannot, so it never removes a part another process is
reading or fetching (whose disk space would not come back until it closed it). ``verify --repair``
waits for the lock instead: a damaged part is removed as soon as its readers are done with it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
from dataclasses import dataclass
from typing import Any

from ._text import parse_size
from .cache import Cache, read_only
from .delta import TensorIndex
from .errors import SpecError, StoreError
from .hashing import digest_file
from .store import BLOB_FILE, backend_errors, file_lock

__all__ = [
    "CacheListing",
    "CacheVerifyReport",
    "CachedFile",
    "PartVerdict",
    "PruneReport",
    "cache_ls",
    "cache_prune",
    "cache_verify",
]

#: A stopped (or running) download of a part, or an assembly of one (:mod:`sepstore.delta`).
_PARTIAL = re.compile(r"^([0-9a-f]{64})\.(?:partial|assembling)\Z")


@dataclass(frozen=True)
class CachedFile:
    """A part in the cache, or a partial download of one (``partial``: ``incoming/<hex>.partial``,
    or ``.assembling`` for a part assembled from cached tensors): its digest, path, bytes on disk,
    and time of last use (UTC). ``active`` is set on a partial download another process is
    fetching now (else it is a stopped one: the next pull of the part resumes a ``.partial`` and
    deletes an ``.assembling``)."""

    digest: str
    path: str
    size: int
    last_used: dt.datetime
    partial: bool = False
    active: bool = False

    @property
    def asset(self) -> bool:
        """Whether this is an asset (a bare ``<hex>`` file; a part's file ends in ``.safetensors``).
        A partial download's name does not say which it is: ``False``."""
        return not self.partial and not self.path.endswith(".safetensors")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "digest": self.digest,
            "path": self.path,
            "size": self.size,
            "last_used": self.last_used.isoformat(),
        }
        if self.partial:
            out["active"] = self.active
        else:
            out["asset"] = self.asset
        return out


@dataclass(frozen=True)
class CacheListing:
    """What a cache holds: its parts (most recently used first) and partial downloads."""

    root: str
    parts: list[CachedFile]
    partial: list[CachedFile]

    @property
    def total_bytes(self) -> int:
        """Bytes of every part and partial download on disk."""
        return sum(f.size for f in (*self.parts, *self.partial))

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache": self.root,
            "parts": [f.to_dict() for f in self.parts],
            "partial": [f.to_dict() for f in self.partial],
            "total_bytes": self.total_bytes,
        }


@dataclass(frozen=True)
class PartVerdict:
    """One cached part (or asset: ``asset``) re-hashed: ``error`` says how its bytes differ from
    its name (``None``: intact); ``removed``, that the damaged file was deleted (``repair``)."""

    digest: str
    size: int
    error: str | None
    removed: bool = False
    asset: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "ok": self.error is None, "error": self.error,
                "removed": self.removed, "asset": self.asset}  # fmt: skip


@dataclass(frozen=True)
class CacheVerifyReport:
    """Every cached part re-hashed; ``ok`` when no damaged part remains (none found, or all removed)."""

    root: str
    parts: list[PartVerdict]

    @property
    def bad(self) -> list[PartVerdict]:
        return [p for p in self.parts if p.error is not None]

    @property
    def ok(self) -> bool:
        return all(p.removed for p in self.bad)

    def to_dict(self) -> dict[str, Any]:
        return {"cache": self.root, "ok": self.ok, "parts": [p.to_dict() for p in self.parts]}


@dataclass(frozen=True)
class PruneReport:
    """What ``prune`` removed (or, in a dry run, would remove), least recently used first; what it
    left because another process was reading or fetching it (or used it since it was listed); the
    cache's bytes before and after."""

    root: str
    max_size: int
    removed: list[CachedFile]
    in_use: list[CachedFile]
    bytes_before: int
    bytes_after: int
    dry_run: bool

    @property
    def removed_bytes(self) -> int:
        return sum(f.size for f in self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache": self.root,
            "max_size": self.max_size,
            "removed": [f.to_dict() for f in self.removed],
            "removed_bytes": self.removed_bytes,
            "in_use": [f.to_dict() for f in self.in_use],
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "dry_run": self.dry_run,
        }


def _open(cache_dir: str | os.PathLike[str] | None) -> Cache:
    """The cache at ``cache_dir`` (default ``$SEPSTORE_CACHE``); a store root is refused, since a
    local store has the cache's ``parts/blake3/`` layout and pruning it would break its manifests."""
    cache = Cache(cache_dir)
    if os.path.isdir(os.path.join(cache.root, "manifests")):
        raise StoreError(
            f"{cache.root} is a store (it has manifests/), not a cache; `sepstore gc` removes a store's "
            "unreferenced parts"
        )
    return cache


def _last_used(info: os.stat_result) -> dt.datetime:
    return dt.datetime.fromtimestamp(info.st_mtime, dt.timezone.utc)


def _scan(folder: str, pattern: re.Pattern[str], *, partial: bool) -> list[CachedFile]:
    out = []
    with backend_errors(folder):
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        for base in names:
            match = pattern.match(base)
            if match is None:
                continue
            path = os.path.join(folder, base)
            try:
                info = os.stat(path)
            except FileNotFoundError:
                continue  # removed since the listing
            # a partial file is as long as the part from the start: its blocks are what it holds
            size = min(info.st_blocks * 512, info.st_size) if partial else info.st_size
            out.append(CachedFile(f"blake3:{match[1]}", path, size, _last_used(info), partial=partial))
    return out


def _fetching(cache: Cache, item: CachedFile) -> bool:
    """Whether another process holds the part's lock (fetching it, for a partial download); a
    cache this user cannot write to cannot be asked, and says no."""
    try:
        with file_lock(cache.lock_path(item.digest), blocking=False) as got:
            return not got
    except OSError as exc:
        if not read_only(exc):
            raise
        return False


def cache_ls(cache_dir: str | os.PathLike[str] | None = None) -> CacheListing:
    """The parts a cache holds (most recently used first) and its partial downloads.

    ``cache_dir`` defaults to ``$SEPSTORE_CACHE``, else ``~/.cache/sepstore``; a folder that does
    not exist yet is an empty cache. See this module's docstring for what "last used" means.
    """
    cache = _open(cache_dir)
    parts = _scan(cache.parts, BLOB_FILE, partial=False)
    partial = _scan(cache.incoming, _PARTIAL, partial=True)
    partial = [
        CachedFile(f.digest, f.path, f.size, f.last_used, partial=True, active=_fetching(cache, f)) for f in partial
    ]

    def recent_first(f: CachedFile) -> tuple[float, str]:
        return -f.last_used.timestamp(), f.digest

    return CacheListing(cache.root, sorted(parts, key=recent_first), sorted(partial, key=recent_first))


def cache_verify(cache_dir: str | os.PathLike[str] | None = None, *, repair: bool = False) -> CacheVerifyReport:
    """Re-hash every cached part and compare it with the digest it is filed under.

    With ``repair``, a damaged part is deleted (once no other process is reading it). The cache
    does not know which manifests list a part, so it cannot fetch it again here: the next
    ``load`` or ``pull`` of a model that needs it does. Partial downloads are not checked: they are
    verified when they finish.
    """
    cache = _open(cache_dir)
    verdicts = []
    for item in sorted(_scan(cache.parts, BLOB_FILE, partial=False), key=lambda f: f.digest):
        with backend_errors(item.path):
            try:
                before = os.stat(item.path)
                got = digest_file(item.path)
            except FileNotFoundError:
                continue  # removed since the listing
            error = None if got == item.digest else f"bytes hash to {got}"
            removed = error is not None and repair
            if removed:
                _remove_if_same(cache, item, before)
        verdicts.append(PartVerdict(item.digest, item.size, error, removed, item.asset))
    return CacheVerifyReport(cache.root, verdicts)


def _remove_if_same(cache: Cache, item: CachedFile, hashed: os.stat_result) -> None:
    """Delete a damaged part once no one reads it, unless it was replaced since it was hashed (a
    reader that found it damaged deletes it and fetches it again, verified); the damaged file is
    gone either way."""
    os.makedirs(cache.incoming, exist_ok=True)
    with file_lock(cache.lock_path(item.digest)), contextlib.suppress(FileNotFoundError):
        now = os.stat(item.path)
        if (now.st_dev, now.st_ino) == (hashed.st_dev, hashed.st_ino):
            os.unlink(item.path)


def cache_prune(
    max_size: int | str, *, cache_dir: str | os.PathLike[str] | None = None, dry_run: bool = False
) -> PruneReport:
    """Remove parts, least recently used first, until the cache holds at most ``max_size`` bytes
    (an int, or a size such as ``"20GiB"``). Stopped partial downloads count and go in the same
    order (by when they last grew); a part or download another process is reading or fetching is
    left, so the cache may stay above ``max_size`` (the report says what was in use).
    """
    limit = parse_size(max_size) if isinstance(max_size, str) else max_size
    if type(limit) is not int or limit < 0:
        raise SpecError(f"max_size= is a number of bytes >= 0 or a size such as '20GiB', got {max_size!r}")
    cache = _open(cache_dir)
    listing = cache_ls(cache.root)
    total = before = listing.total_bytes
    removed: list[CachedFile] = []
    in_use: list[CachedFile] = []
    for item in sorted((*listing.parts, *listing.partial), key=lambda f: (f.last_used, f.digest)):
        if total <= limit:
            break
        if item.active:
            in_use.append(item)
            continue
        with backend_errors(item.path):
            os.makedirs(cache.incoming, exist_ok=True)
            with file_lock(cache.lock_path(item.digest), blocking=False) as got:
                try:
                    now = os.stat(item.path)
                except FileNotFoundError:
                    total -= item.size  # removed by another process meanwhile
                    continue
                if not got or _last_used(now) > item.last_used:
                    in_use.append(item)
                    continue
                if not dry_run:
                    _delete(cache, item)
        removed.append(item)
        total -= item.size
    return PruneReport(cache.root, limit, removed, in_use, before, total, dry_run)


def _delete(cache: Cache, item: CachedFile) -> None:
    """Delete a part with its tensor index file (:mod:`sepstore.delta`), or a partial download
    with its log of finished ranges."""
    for path in [item.path, item.path + ".done"] if item.partial else [item.path]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if not item.partial:
        TensorIndex(cache).forget([item.digest])
