"""The local cache of remote parts and assets: the store's ``parts/blake3/`` layout, verified on the way in.

Parts are fetched in bounded-concurrency ranged reads, each streamed in pieces of at most
:data:`~sepstore.backends.PIECE_BYTES` into ``incoming/<hex>.partial`` and cut at the length asked
for (a ``.done`` log beside it records finished ranges, so a killed pull resumes where it stopped),
then hashed, and renamed to their digest name only when size and digest match: the cache never
holds a file under a name its bytes do not have. A pull that would not fit on the cache's disk is
refused before anything is written. A per-part ``flock`` keeps several processes from fetching the
same part; a process that finds a part locked fetches its other parts first, then waits for that
one. A part's first chunk is asked for alone: a server that ignores ``Range`` (``python -m
http.server``) answers it with the whole part, which is streamed in whole, and the part's other
chunks are skipped.

The digest is computed from the finished file (BLAKE3's threads over a memory map of it), not
while the pieces arrive: ranged chunks arrive out of order and a resumed pull has bytes from an
earlier process, so hashing the file once is what covers every byte exactly once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import fsspec
from tqdm.auto import tqdm

from ._text import counted, human_bytes
from .backends import stream_range
from .errors import IntegrityError, StoreError
from .hashing import digest_file, digest_hex
from .manifest import Blob
from .retry import with_retries
from .safetensors_io import pwrite_all
from .store import PARTS_DIR, backend_errors, file_lock, replace_durably

__all__ = ["CHUNK_BYTES", "Cache", "Fetch", "default_cache_dir", "read_only"]

#: Parts larger than this are fetched as concurrent ranged reads of this size.
CHUNK_BYTES = 32 * 1024 * 1024
DEFAULT_WORKERS = 8


def read_only(exc: OSError) -> bool:
    """Whether ``exc`` says this user cannot write there (a read-only mount, another user's folder)."""
    return exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


def default_cache_dir() -> str:
    """``$SEPSTORE_CACHE``, else ``~/.cache/sepstore``."""
    return os.environ.get("SEPSTORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sepstore")


@dataclass(frozen=True)
class Fetch:
    """One part (or asset) to bring into the cache: where it is, and what the manifest says it is."""

    fs: fsspec.AbstractFileSystem
    src: str
    url: str
    part: Blob
    label: str


@dataclass
class _Download:
    item: Fetch
    final: str
    partial: str
    log: str = field(init=False)
    #: The part is fetched in ``count`` chunks of ``chunk`` bytes (``CHUNK_BYTES`` when it started).
    chunk: int = field(init=False)
    count: int = field(init=False)
    #: Chunk indices already in the partial file (and counted on the progress bar).
    logged: set[int] = field(init=False, default_factory=set)
    lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.log = self.partial + ".done"
        self.chunk = CHUNK_BYTES
        self.count = -(-self.item.part.size // self.chunk)

    def span(self, index: int) -> tuple[int, int]:
        """The bytes ``start:end`` of chunk ``index``."""
        start = index * self.chunk
        return start, min(start + self.chunk, self.item.part.size)

    def open(self) -> list[int]:
        """Prepare the partial file; the chunk indices still to fetch (all, unless resuming)."""
        done: set[int] = set()
        if os.path.exists(self.partial) and os.path.getsize(self.partial) == self.item.part.size:
            with contextlib.suppress(FileNotFoundError), open(self.log) as log:
                done = {int(line) for line in log if line.endswith("\n") and line[:-1].isdigit()}  # whole lines only
        else:
            self.discard()
        with open(self.partial, "ab") as f:
            f.truncate(self.item.part.size)
        self.logged = {i for i in done if i < self.count}
        return [i for i in range(self.count) if i not in self.logged]

    def fetch_chunk(self, index: int, bar: tqdm | None) -> None:
        """Stream chunk ``index`` into the partial file (or the whole part, from a server that
        ignores ``Range``) and log it; a wrong answer is refused, a failed transfer retried."""
        if len(self.logged) == self.count:
            return  # a server that ignores ranges already sent the whole part
        item, (start, end) = self.item, self.span(index)
        fd = os.open(self.partial, os.O_WRONLY)
        try:

            def write(offset: int, piece: bytes) -> None:
                pwrite_all(fd, piece, offset)

            span = with_retries(
                lambda: stream_range(item.fs, item.src, item.url, start, end, item.part.size, write), item.url
            )
        finally:
            os.close(fd)
        indices = range(self.count) if span != (start, end) else [index]
        with self.lock:
            new = [i for i in indices if i not in self.logged]
            if not new:
                return
            with open(self.log, "a") as log:
                log.write("".join(f"{i}\n" for i in new))
            self.logged.update(new)
        if bar is not None:
            bar.update(sum(self.span(i)[1] - self.span(i)[0] for i in new))

    def finish(self) -> None:
        """Verify the partial file and rename it into place, or delete it and refuse it."""
        part, url = self.item.part, self.item.url
        got = digest_file(self.partial)
        if got != part.digest:
            self.discard()
            raise IntegrityError(f"part {self.item.label} at {url}: digest is {got}, manifest says {part.digest}")
        replace_durably(self.partial, self.final)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log)

    def discard(self) -> None:
        for path in (self.partial, self.log):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class Cache:
    """A verified cache of parts under ``root`` (default :func:`default_cache_dir`)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = os.path.abspath(os.fspath(root) if root is not None else default_cache_dir())
        self.parts = os.path.join(self.root, *PARTS_DIR.split("/"))
        self.incoming = os.path.join(self.root, "incoming")  # partial downloads and locks, same filesystem

    def path(self, blob: Blob) -> str:
        """Where the cache keeps a part's or an asset's file."""
        return os.path.join(self.parts, blob.file_name)

    def has(self, blob: Blob) -> bool:
        return os.path.exists(self.path(blob))

    def lock_path(self, digest: str) -> str:
        """The part's lock: held exclusively while it is fetched or removed, shared while it is read."""
        return os.path.join(self.incoming, f"{digest_hex(digest)}.lock")

    @contextlib.contextmanager
    def reading(self, blob: Blob) -> Iterator[None]:
        """Hold the part's lock shared for the ``with`` block, so that ``cache prune`` and
        ``cache verify --repair`` leave it alone, and mark it used now (see :mod:`sepstore.cache_admin`)."""
        with contextlib.ExitStack() as held:
            try:
                os.makedirs(self.incoming, exist_ok=True)
                held.enter_context(file_lock(self.lock_path(blob.digest), shared=True))
            except OSError as exc:
                if not read_only(exc):
                    raise StoreError(f"{self.root}: cannot lock {blob.digest} for reading ({exc})") from exc
                # a cache this user cannot write to (read-only, another user's): this user cannot
                # prune it either, so it is read as before locks existed
            with contextlib.suppress(OSError):  # not ours to touch (a cache shared by several users)
                os.utime(self.path(blob))
            yield

    def fetch(self, items: Sequence[Fetch], *, workers: int = DEFAULT_WORKERS, bar: tqdm | None = None) -> list[Fetch]:
        """Bring every part of ``items`` into the cache; returns those this call fetched."""
        with backend_errors(self.root):
            os.makedirs(self.parts, exist_ok=True)
            os.makedirs(self.incoming, exist_ok=True)
        todo = sorted({i.part.file_name: i for i in items if not self.has(i.part)}.values(), key=_file_name)
        self._check_space(todo)
        fetched: list[Fetch] = []
        with contextlib.ExitStack() as locks:
            mine, theirs = [], []
            for item in todo:
                got = locks.enter_context(file_lock(self._lock(item), blocking=False))
                (mine if got else theirs).append(item)
            fetched += self._download_verified([i for i in mine if not self.has(i.part)], workers, bar)
        for item in theirs:  # another process is fetching these: wait for it, then take over if it died
            with file_lock(self._lock(item), blocking=True):
                if not self.has(item.part):
                    fetched += self._download_verified([item], workers, bar)
        return fetched

    def _check_space(self, todo: Sequence[Fetch]) -> None:
        """Refuse, before anything is written, parts that cannot fit on the cache's disk (bytes a
        resumable partial file already holds count as there)."""
        need = 0
        for item in todo:
            try:
                held = os.stat(self._incoming(item, ".partial")).st_blocks * 512
            except FileNotFoundError:
                held = 0
            need += max(0, item.part.size - held)
        with backend_errors(self.root):
            free = shutil.disk_usage(self.incoming).free
        if need > free:
            raise StoreError(
                f"{self.root}: fetching {counted(len(todo), 'part')} needs {human_bytes(need)}, only "
                f"{human_bytes(free)} is free there; free some space or pass another cache_dir"
            )

    def _download_verified(self, items: list[Fetch], workers: int, bar: tqdm | None) -> list[Fetch]:
        """Download ``items``; a part whose bytes do not match is fetched once more from scratch
        (a flipped bit in transit), then refused with the :class:`IntegrityError`."""
        failed = self._download(items, workers, bar)
        if failed:
            if bar is not None:
                bar.total += sum(f.part.size for f, _ in failed)
            again = self._download([f for f, _ in failed], workers, bar)
            if again:
                raise again[0][1]
        return items

    def _incoming(self, item: Fetch, suffix: str) -> str:
        # By digest alone (a part and an asset of the same bytes share it, and take turns).
        return os.path.join(self.incoming, digest_hex(item.part.digest) + suffix)

    def _lock(self, item: Fetch) -> str:
        return self.lock_path(item.part.digest)

    def _download(self, items: list[Fetch], workers: int, bar: tqdm | None) -> list[tuple[Fetch, IntegrityError]]:
        """Fetch ``items`` in parallel ranged reads; those whose bytes did not verify (and were discarded)."""
        downloads = [_Download(i, self.path(i.part), self._incoming(i, ".partial")) for i in items]
        failed: list[tuple[Fetch, IntegrityError]] = []

        def finish(n: int) -> None:
            try:
                downloads[n].finish()
            except IntegrityError as exc:
                failed.append((downloads[n].item, exc))

        remaining: dict[int, int] = {}
        rest: dict[int, list[int]] = {}  # chunks asked for once the part's first answer is in
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sepstore-fetch") as pool:
            futures: dict[Future[None], int] = {}
            for n, dl in enumerate(downloads):
                chunks = dl.open()
                if bar is not None:
                    bar.update(sum(dl.span(i)[1] - dl.span(i)[0] for i in dl.logged))
                remaining[n] = len(chunks)
                if not chunks:
                    finish(n)
                    continue
                # One chunk first: a server that ignores Range answers it with the whole part, and
                # the part's other chunks are then never asked for (not once per chunk in flight).
                futures[pool.submit(dl.fetch_chunk, chunks[0], bar)] = n
                rest[n] = chunks[1:]
            pending = set(futures)
            failure: tuple[int, BaseException] | None = None
            while pending and failure is None:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    exc = future.exception()
                    if exc is not None:
                        for other in pending:
                            other.cancel()
                        failure = (futures[future], exc)
                        break
                    n = futures[future]
                    for chunk in rest.pop(n, []):
                        later = pool.submit(downloads[n].fetch_chunk, chunk, bar)
                        futures[later] = n
                        pending.add(later)
                    remaining[n] -= 1
                    if remaining[n] == 0:
                        finish(n)
        if failure is not None:  # raised once the pool's other reads have stopped writing
            n, exc = failure
            for i, dl in enumerate(downloads):
                # kept to resume only with bytes in them, and not after a wrong answer (not one cut short)
                if not dl.logged or (i == n and isinstance(exc, IntegrityError)):
                    dl.discard()
            raise exc
        return failed


def _file_name(item: Fetch) -> str:
    return item.part.file_name
