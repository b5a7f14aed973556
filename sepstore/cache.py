"""The local cache of remote parts and assets: the store's ``parts/blake3/`` layout, verified on the way in.

Parts are fetched in bounded-concurrency ranged reads, each streamed in pieces of at most
:data:`~sepstore.backends.PIECE_BYTES` into ``incoming/<hex>.partial`` and cut at the length asked
for (a ``.done`` log beside it records finished ranges, so a killed pull resumes where it stopped),
and renamed to their digest name only when size and digest match: the cache never holds a file
under a name its bytes do not have. A pull that would not fit on the cache's disk is refused
before anything is written. A per-part ``flock`` keeps several processes from fetching the same
part; a process that finds a part locked fetches its other parts first, then waits for that one.
A part's first chunk is asked for alone: a server that ignores ``Range`` (``python -m
http.server``) answers it with the whole part, which is streamed in whole, and the part's other
chunks are skipped.

The digest is computed while the bytes arrive, in their order in the part (with the SHA-256 a
registry names the blob by, checked too, see :meth:`~sepstore.stores.base.Blobs.extra_digests`): a piece that is the
digest's next byte is hashed as soon as it is written (still in the CPU's cache), by the thread
that received it; a piece that arrives ahead of the bytes before it (ranged chunks come in out of
order) is written and waits, and is hashed from the file as soon as the gap before it is filled.
The bytes of a resumed pull that an earlier process wrote are hashed from the file in their turn
too. Each byte is written once (a retried transfer asks only for what it still lacks) and hashed
once, so the digest is of exactly the file's bytes, with no second pass over the file.

Bytes received into the caller's memory (a load by URL: page-aligned tensor memory) are hashed
from there and written to the file from there too, by the receiving thread, a few MiB behind the
receive, so that the writes are blocks aligned in memory and in the file, which go past the page
cache (:mod:`sepstore.directio`): no kernel copy of every byte, no page cache filled with bytes the
node holds in its tensors already, and next to nothing left for ``fsync``. A chunk is logged in
``.done`` only once all its bytes are in the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from blake3 import blake3
from tqdm.auto import tqdm

from ._text import counted, human_bytes
from .backends import PIECE_BYTES
from .directio import ALIGN, DirectFile
from .errors import IntegrityError, StoreError
from .hashing import Hasher, digest_hex, digest_of
from .manifest import Blob
from .retry import with_retries
from .store import PARTS_DIR, backend_errors, file_lock, replace_durably
from .stores.base import Blobs, algorithm_name

__all__ = ["CHUNK_BYTES", "Cache", "Fetch", "InOrderDigest", "default_cache_dir", "read_only"]

#: Parts larger than this are fetched as concurrent ranged reads of this size.
CHUNK_BYTES = 32 * 1024 * 1024
DEFAULT_WORKERS = 8
#: Bytes received into the caller's memory are written to the cache file once this many are in
#: (and the rest at a chunk's end): large aligned writes, straight from that memory.
TRAIL_BYTES = 4 * 1024 * 1024


def read_only(exc: OSError) -> bool:
    """Whether ``exc`` says this user cannot write there (a read-only mount, another user's folder)."""
    return exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


def default_cache_dir() -> str:
    """``$SEPSTORE_CACHE``, else ``~/.cache/sepstore``."""
    return os.environ.get("SEPSTORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sepstore")


@dataclass(frozen=True)
class Fetch:
    """One part (or asset) to bring into the cache: where it is read, and what the manifest says it is."""

    source: Blobs
    part: Blob
    label: str

    @property
    def url(self) -> str:
        """The part's URL where it is read, for messages."""
        return self.source.blob_url(self.part)


@dataclass
class _Download:
    item: Fetch
    final: str
    partial: str
    #: Memory that receives the part's bytes too (the caller's tensors), or ``None``.
    into: memoryview | None = None
    #: Told the length of each piece that comes in over the network.
    received: Callable[[int], None] | None = None
    log: str = field(init=False)
    #: The part is fetched in ``count`` chunks of ``chunk`` bytes (``CHUNK_BYTES`` when it started).
    chunk: int = field(init=False)
    count: int = field(init=False)
    #: Chunk indices already in the partial file (and counted on the progress bar).
    logged: set[int] = field(init=False, default_factory=set)
    #: The chunk asked for first, alone (-1 once none is left to ask for).
    first: int = field(init=False, default=-1)
    lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    #: The part's digest, of its bytes in order as they are written.
    digest: InOrderDigest = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.partial + ".done"
        self.chunk = CHUNK_BYTES
        self.count = -(-self.item.part.size // self.chunk)
        #: Digests besides BLAKE3 the part must have (a registry's SHA-256), computed alongside it.
        self.extra = self.item.source.extra_digests(self.item.part)
        self.digest = InOrderDigest(
            self.partial, self.item.part.size, self.item.label, self.into, extra={n: hashlib.new(n) for n in self.extra}
        )

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
        todo = [i for i in range(self.count) if i not in self.logged]
        self.first = todo[0] if todo else -1
        for i in self.logged:  # an earlier process's bytes: hashed from the file in their turn
            self.digest.waiting[self.span(i)[0]] = (self.span(i)[1], False)
        return todo

    def fetch_chunk(self, index: int, bar: tqdm | None) -> None:
        """Stream chunk ``index`` into the partial file and log it. The part's first chunk is asked
        for alone (:meth:`Cache._download`): if the server ignores ``Range`` and sends the whole part,
        that answer fills every chunk not logged yet. A wrong answer is refused; a failed transfer
        is tried again from the first byte it still lacks, so no byte is written, or hashed, twice."""
        if len(self.logged) == self.count:
            return  # a server that ignores ranges already sent the whole part
        item, (start, end) = self.item, self.span(index)
        alone = index == self.first
        size = item.part.size
        asked, wanted, whole = (start, end), end, False  # wanted: the end of what this call fills
        written = start  # bytes start:written are received (and in the file, without `into`)
        filed = start  # with `into`: bytes start:filed are in the file

        def file(upto: int, least: int) -> None:
            """With ``into``: write its bytes ``filed:upto`` (received) to the file, once at least
            ``least`` of them are there, trailing the receive so that they go in blocks aligned
            in memory and in the file, past the page cache (:class:`DirectFile`); an earlier
            process's chunks keep their bytes."""
            nonlocal filed
            if self.into is None or upto - filed < least:
                return
            for i in range(filed // self.chunk, (upto - 1) // self.chunk + 1):
                if i not in self.logged:
                    a, b = self.span(i)
                    a, b = max(a, filed), min(b, upto)
                    out.pwrite(self.into[a:b], a)
            filed = upto

        def write(offset: int, piece: memoryview) -> None:
            nonlocal wanted, whole, written
            if self.received is not None:
                self.received(len(piece))
            if alone and not whole and (offset < asked[0] or offset + len(piece) > asked[1]):
                wanted, whole = size, True  # the server ignored Range: this is the part from its first byte
            lo, hi = max(offset, written), min(offset + len(piece), wanted)
            if lo >= hi:
                return  # written by an earlier try, or another chunk's bytes
            if not whole:
                self._received(out, lo, piece[lo - offset : hi - offset])
            for i in range(lo // self.chunk, (hi - 1) // self.chunk + 1) if whole else ():
                a, b = self.span(i)
                a, b = max(a, lo), min(b, hi)
                if i not in self.logged:  # an earlier process's chunks keep their bytes
                    self._received(out, a, piece[a - offset : b - offset])
            written = hi
            file(hi // ALIGN * ALIGN, TRAIL_BYTES)

        if self.into is not None:
            _touch(self.into[start:end])

        def attempt() -> None:
            nonlocal asked
            asked = (written, wanted)
            if written < wanted:
                item.source.stream_blob_range(item.part, written, wanted, write, into=self.into)

        with backend_errors(self.partial):  # the cache's own disk (full, say): not the server's fault
            out = DirectFile(self.partial)
            try:
                with_retries(attempt, item.url)
                file(written, 1)  # the rest: the chunk is logged only once all its bytes are in the file
            finally:
                out.close()
            indices = range(self.count) if whole else [index]
            with self.lock:
                new = [i for i in indices if i not in self.logged]
                if not new:
                    return
                with open(self.log, "a") as log:
                    log.write("".join(f"{i}\n" for i in new))
                self.logged.update(new)
        if bar is not None:
            bar.update(sum(self.span(i)[1] - self.span(i)[0] for i in new))

    def _received(self, out: DirectFile, offset: int, piece: memoryview) -> None:
        """Hash ``piece``, the part's bytes at ``offset``, in its turn: kept in ``into`` (and
        written to the file later, from there, see :meth:`fetch_chunk`), else written to the file now."""
        if self.into is None:
            self.digest.write(out, offset, piece)
            return
        end = offset + len(piece)
        if piece.obj is not self.into.obj:  # else read into its place already
            self.into[offset:end] = piece
            piece = self.into[offset:end]  # what is hashed is what the caller gets
        self.digest.hash(offset, piece, held=True)

    def finish(self) -> None:
        """Hash what is still waiting, check the digest, and rename the partial file into place,
        or delete it and refuse it."""
        part, url = self.item.part, self.item.url
        got = self.digest.result()
        complete = self.digest.hashed == part.size
        for name, expected in self.extra.items():  # first: it names the blob as the source does
            other = self.digest.extra_result(name)
            if complete and other != expected:
                self.discard()
                what = algorithm_name(name)
                raise IntegrityError(
                    f"part {self.item.label} at {url}: its {what} is {other}, the blob is named {expected}"
                )
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


@dataclass(frozen=True)
class _Receiving:
    """How one :meth:`Cache.fetch` call receives its parts (see there)."""

    workers: int
    bar: tqdm | None
    into: Mapping[str, memoryview]
    received: Callable[[int], None] | None


class InOrderDigest:
    """The BLAKE3 digest of a ``size``-byte file's bytes in order, while they are written there in
    pieces in any order, by several threads: a piece that is the digest's next byte is hashed as
    soon as it is written (still in the CPU's cache), by the thread that wrote it; a piece ahead of
    the bytes before it waits, and is hashed from the file (or from ``into``, which holds the
    file's bytes too) by the thread that fills the gap before it. Each byte written once is hashed
    once, so the digest is of exactly the file's bytes, with no second pass over the file.
    ``extra`` hashers (:mod:`hashlib` objects by name, such as a registry's SHA-256) are fed the same
    bytes in the same order (:meth:`extra_result`)."""

    def __init__(
        self,
        path: str,
        size: int,
        label: str,
        into: memoryview | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.path, self.size, self.label, self.into = path, size, label, into
        self.lock = threading.Lock()
        #: The digest so far, of bytes ``0:hashed`` of the file, in order.
        self.hasher: blake3 = Hasher()
        self.extra = dict(extra or {})
        self.hashed = 0
        #: Spans ``start: (end, whether they are in `into` already)`` of the file that are written
        #: (each once) but not hashed yet.
        self.waiting: dict[int, tuple[int, bool]] = {}
        #: Whether a thread is hashing (one at a time: the digest is of the bytes in order).
        self.hashing = False

    def write(self, out: DirectFile, offset: int, piece: memoryview, *, held: bool = False) -> None:
        """Write ``piece`` at ``offset`` of the file (open as ``out``), each byte once, and hash it
        (:meth:`hash`). ``held``: the piece is ``into``'s bytes there."""
        out.pwrite(piece, offset)
        self.hash(offset, piece, held=held)

    def hash(self, offset: int, piece: memoryview, *, held: bool = False) -> None:
        """Hash ``piece``, the file's bytes at ``offset`` (each byte once): now if it is the
        digest's next byte and no other thread is hashing, else in its turn, from ``into`` if
        ``held`` (the piece is ``into``'s bytes there), else from the file (written before this)."""
        end = offset + len(piece)
        with self.lock:
            if self.hashing or (offset != self.hashed and self.hashed not in self.waiting):
                self.waiting[offset] = (end, held)
                return  # the thread hashing, or the one that brings the bytes before these, hashes them
            self.hashing = True
            inline = offset == self.hashed
            if not inline:
                self.waiting[offset] = (end, held)
        if inline:
            try:
                self._update(piece)
            except BaseException:
                with self.lock:
                    self.hashing = False
                raise
            with self.lock:
                self.hashed = end
        self._catch_up()

    def _catch_up(self) -> None:
        """Hash the waiting spans that follow the digest's last byte, up to the first gap: from
        ``into`` where they are there already, else read from the file (into ``into``, if given);
        the caller has set ``hashing`` (this clears it)."""
        fd, scratch = -1, memoryview(b"")
        try:
            while True:
                with self.lock:
                    at = self.hashed
                    end, held = self.waiting.pop(at, (-1, False))
                    if end < 0:
                        self.hashing = False
                        return
                if held and self.into is not None:
                    self._update(self.into[at:end])
                    at = end
                elif fd < 0:
                    fd = os.open(self.path, os.O_RDONLY)
                    if self.into is None:
                        scratch = memoryview(bytearray(min(PIECE_BYTES, self.size)))
                while at < end:
                    buffer = self.into[at:end] if self.into is not None else scratch[: min(len(scratch), end - at)]
                    got = os.preadv(fd, [buffer], at)
                    if got <= 0:
                        raise IntegrityError(f"part {self.label}: {self.path} ends at byte {at}, cut short")
                    self._update(buffer[:got])
                    at += got
                with self.lock:
                    self.hashed = end
        except BaseException:
            with self.lock:
                self.hashing = False
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    def _update(self, data: memoryview) -> None:
        self.hasher.update(data)
        for other in self.extra.values():
            other.update(data)

    def extra_result(self, name: str) -> str:
        """The ``extra`` digest ``name`` of the bytes hashed (``<name>:<hex>``), once :meth:`result` is known."""
        return f"{name}:{self.extra[name].hexdigest()}"

    def result(self) -> str:
        """Hash what is still waiting (every write is done: no other thread is left to hash); the
        digest, or why there is none (a byte never written)."""
        self.hashing = True
        self._catch_up()
        return digest_of(self.hasher) if self.hashed == self.size else f"incomplete, {self.hashed} bytes hashed"


#: ``madvise`` advice (Linux 5.14+): map every page of a range now, writable, as a write would.
_MADV_POPULATE_WRITE = 23
_PAGE = mmap.PAGESIZE


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # not a POSIX libc
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise  # type: ignore[no-any-return]


_madvise = _libc_madvise() if sys.platform == "linux" else None


def _touch(memory: memoryview) -> None:
    """Map every page of ``memory`` before the bytes come, without holding the GIL: the kernel maps
    fresh memory a page at a time as it is first written, slowly in a VM (a fault per page). Asked
    for a whole range at once (``MADV_POPULATE_WRITE``) it is about twice as fast as faulting the
    pages in one by one; where the kernel cannot, the pages are written (zeros)."""
    if not len(memory):
        return
    start = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    first, end = -(-start // _PAGE) * _PAGE, (start + len(memory)) // _PAGE * _PAGE
    if _madvise is not None and end > first and _madvise(first, end - first, _MADV_POPULATE_WRITE) == 0:
        ctypes.memset(start, 0, first - start)  # the partial pages at either end
        ctypes.memset(end, 0, start + len(memory) - end)
        return
    ctypes.memset(start, 0, len(memory))


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

    def fetch(
        self,
        items: Sequence[Fetch],
        *,
        workers: int = DEFAULT_WORKERS,
        bar: tqdm | None = None,
        into: Mapping[str, memoryview] | None = None,
        received: Callable[[int], None] | None = None,
    ) -> list[Fetch]:
        """Bring every part of ``items`` into the cache; returns those this call fetched. A part
        whose digest ``into`` maps to a buffer of its size is received into that buffer too, and
        hashed from it: once it is among those returned, the buffer holds its verified bytes.
        ``received`` is told the length of each piece that comes in over the network (a resumed
        part's bytes from an earlier call never do)."""
        with backend_errors(self.root):
            os.makedirs(self.parts, exist_ok=True)
            os.makedirs(self.incoming, exist_ok=True)
        todo = sorted({i.part.file_name: i for i in items if not self.has(i.part)}.values(), key=_file_name)
        self._check_space(todo)
        how = _Receiving(workers, bar, into or {}, received)
        fetched: list[Fetch] = []
        with contextlib.ExitStack() as locks:
            mine, theirs = [], []
            for item in todo:
                got = locks.enter_context(file_lock(self._lock(item), blocking=False))
                (mine if got else theirs).append(item)
            fetched += self._download_verified([i for i in mine if not self.has(i.part)], how)
        for item in theirs:  # another process is fetching these: wait for it, then take over if it died
            with file_lock(self._lock(item), blocking=True):
                if not self.has(item.part):
                    fetched += self._download_verified([item], how)
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

    def _download_verified(self, items: list[Fetch], how: _Receiving) -> list[Fetch]:
        """Download ``items``; a part whose bytes do not match is fetched once more from scratch
        (a flipped bit in transit), then refused with the :class:`IntegrityError`."""
        failed = self._download(items, how)
        if failed:
            if how.bar is not None:
                how.bar.total += sum(f.part.size for f, _ in failed)
            again = self._download([f for f, _ in failed], how)
            if again:
                raise again[0][1]
        return items

    def _incoming(self, item: Fetch, suffix: str) -> str:
        # By digest alone (a part and an asset of the same bytes share it, and take turns).
        return os.path.join(self.incoming, digest_hex(item.part.digest) + suffix)

    def _lock(self, item: Fetch) -> str:
        return self.lock_path(item.part.digest)

    def _download(self, items: list[Fetch], how: _Receiving) -> list[tuple[Fetch, IntegrityError]]:
        """Fetch ``items`` in parallel ranged reads; those whose bytes did not verify (and were discarded)."""
        bar = how.bar
        downloads = [
            _Download(i, self.path(i.part), self._incoming(i, ".partial"), how.into.get(i.part.digest), how.received)
            for i in items
        ]
        failed: list[tuple[Fetch, IntegrityError]] = []

        def finish(n: int) -> None:
            try:
                downloads[n].finish()
            except IntegrityError as exc:
                failed.append((downloads[n].item, exc))

        remaining: dict[int, int] = {}
        rest: dict[int, list[int]] = {}  # chunks asked for once the part's first answer is in
        with (
            ThreadPoolExecutor(max_workers=how.workers, thread_name_prefix="sepstore-fetch") as pool,
            ThreadPoolExecutor(max_workers=how.workers, thread_name_prefix="sepstore-finish") as finishing,
        ):
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
            closing: set[Future[None]] = set()  # the parts' finish()
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
                    if future in closing:
                        continue
                    for chunk in rest.pop(n, []):
                        later = pool.submit(downloads[n].fetch_chunk, chunk, bar)
                        futures[later] = n
                        pending.add(later)
                    remaining[n] -= 1
                    if remaining[n] == 0:  # its last chunk: verified and made durable (fsync) on
                        # threads of their own, not here, where the parts' other chunks are handed out
                        last = finishing.submit(finish, n)
                        futures[last] = n
                        closing.add(last)
                        pending.add(last)
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
