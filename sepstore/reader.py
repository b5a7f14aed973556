"""Opening one part: locate its bytes (store or cache), verify them, and return its tensors.

A local part file is read once, in pieces, into memory of its own, and each piece is hashed as
soon as it is there: the digest is of exactly the bytes the tensors are built from, and nothing
done to the file afterwards (a write, a truncation) reaches them. ``mmap=True`` keeps the file's
pages instead (zero copies, under the condition :func:`_mapped` states and checks).

A part that this reader has just fetched was hashed on its way into the cache, as its bytes
arrived (see :mod:`sepstore.cache`), so the read that follows in the same call does not hash it
again; a later call re-hashes the cached file as above. :func:`sepstore.load` has the parts it
fetches received straight into the memory its tensors use (and hashed there), so it does not read
the cached file back at all.
"""

from __future__ import annotations

import contextlib
import mmap as mmap_module  # `mmap` is a keyword of read
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from io import FileIO
from typing import TYPE_CHECKING, TypeVar

from .cache import DEFAULT_WORKERS, Cache, Fetch
from .delta import TensorIndex, Transfer, assemble
from .directio import ALIGN, aligned_start
from .errors import IntegrityError, NotFoundError, StoreError
from .hashing import Hasher, digest_buffer, digest_file, digest_of
from .manifest import Blob, Part
from .progress import progress
from .refs import Resolved
from .safetensors_io import HeaderEntry, header_end, parse_header

if TYPE_CHECKING:
    import torch

__all__ = ["PartReader", "check_header"]

T = TypeVar("T")
#: What :meth:`PartReader.stream` hands each piece of a part to: ``write(offset in the file, piece)``.
Writer = Callable[[int, memoryview], None]

#: Parts are read in pieces of this size, each hashed by a second thread while the next is read,
#: so that it is hashed while still in the CPU's cache: with 4 MiB pieces hashing added about
#: 15% to the read here, with 16 MiB pieces or without the second thread 40-60% (bench_load.py).
READ_PIECE = 4 * 1024 * 1024
#: Times a part is fetched into the cache before a process that keeps pruning it away is given up on.
_ATTEMPTS = 3


def _size_of(path: str) -> int | None:
    """The size of the file at ``path``; ``None`` if there is none (nor its folder)."""
    try:
        return os.stat(path).st_size
    except (FileNotFoundError, NotADirectoryError):
        return None


def _wrong_size(size: int, part: Blob) -> str | None:
    return None if size == part.size else f"file is {size} bytes, manifest says {part.size}"


def check_header(header: dict[str, HeaderEntry], part: Part, where: str) -> None:
    """The file's own header must list exactly the manifest's tensors, with the same dtypes and shapes."""
    if header.keys() != part.tensors.keys():
        missing = sorted(part.tensors.keys() - header.keys())
        extra = sorted(header.keys() - part.tensors.keys())
        raise IntegrityError(f"{where}: header does not match the manifest (missing {missing}, unexpected {extra})")
    for name, expected in part.tensors.items():
        entry = header[name]
        if entry.dtype != expected.dtype or entry.shape != expected.shape:
            raise IntegrityError(
                f"{where}: tensor {name!r} is {entry.dtype}{list(entry.shape)} in the file, "
                f"{expected.dtype}{list(expected.shape)} in the manifest"
            )


class PartReader:
    """Reads the parts of one resolved manifest: in place from a local store, else through the cache."""

    def __init__(
        self, resolved: Resolved, *, cache_dir: str | os.PathLike[str] | None = None, workers: int = DEFAULT_WORKERS
    ) -> None:
        if type(workers) is not int or workers < 1:
            raise StoreError(f"workers= is a whole number of parallel transfers >= 1, got {workers!r}")
        self.resolved = resolved
        #: Where the parts are read (a store, a mirror, a registry repository).
        self.parts = resolved.parts
        self.cache = None if self.parts.local else Cache(cache_dir)
        self.workers = workers
        #: Digests this reader fetched, and so verified, itself: within the one call that reads
        #: them, they are not hashed a second time (a later call re-hashes the cached file).
        self._fresh: set[str] = set()
        #: Parts fetched straight into memory (:meth:`prefetch` with ``in_memory``), by digest, until read.
        self._received: dict[str, torch.Tensor] = {}
        #: Bytes this reader's fetches read over the network, and copied from cached parts instead.
        self.transfer = Transfer()

    def path(self, part: Blob) -> str:
        """Where the part's (or asset's) bytes are (or will be) on local disk."""
        return self.parts.local_path(part) if self.cache is None else self.cache.path(part)

    def missing(self, chosen: Iterable[tuple[str, Blob]]) -> list[Fetch]:
        """The chosen parts (or assets) that are neither local nor cached yet."""
        if self.cache is None:
            return []
        fetches = {part.file_name: Fetch(self.parts, part, label) for label, part in chosen if not self.cache.has(part)}
        return list(fetches.values())

    def prefetch(
        self, chosen: Iterable[tuple[str, Blob]], *, desc: str = "fetch", quiet: bool = False, in_memory: bool = False
    ) -> list[Fetch]:
        """Fetch the chosen parts (or assets) the cache lacks, in parallel; returns what was fetched.
        A part with tensors already cached (in parts of any model) is assembled from them and
        ranged reads of the rest (:mod:`sepstore.delta`); the others are fetched whole. With
        ``in_memory``, each part fetched (whole or assembled) is also received into memory of its
        own, hashed there, and the next :meth:`read` of it takes its tensors from that memory
        instead of reading the file back."""
        chosen = list(chosen)
        todo = self.missing(chosen)
        if self.cache is None:
            return []
        index = TensorIndex(self.cache)
        index.remember(part for _, part in chosen if self.cache.has(part))
        if not todo:
            return []
        into: dict[str, torch.Tensor] = {}
        for item in todo if in_memory else []:
            try:
                into[item.part.digest] = _page_aligned(item.part.size)
            except RuntimeError:  # not that much memory: fetched into the cache only, and refused there or on read
                break
        views = {d: memoryview(t.numpy()) for d, t in into.items()}
        with progress(sum(f.part.size for f in todo), desc, quiet=quiet) as bar:
            assembled = assemble(self.cache, todo, workers=self.workers, bar=bar, transfer=self.transfer, into=views)
            done = {f.part.digest for f in assembled}
            whole = [f for f in todo if f.part.digest not in done]
            # a part that was not assembled (or did not verify) is fetched into the same memory
            fetched = self.cache.fetch(
                whole,
                workers=self.workers,
                bar=bar,
                into=views,
                received=lambda count: self.transfer.add(transferred=count),
            )
        index.remember(f.part for f in fetched)
        fetched += assembled
        self._received.update((f.part.digest, into[f.part.digest]) for f in fetched if f.part.digest in into)
        self._fresh.update(f.part.digest for f in fetched)
        return fetched

    def read(
        self, label: str, part: Part, *, verify: bool = True, mmap: bool = False, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """The part's tensors, sorted by name, after checking size, digest and header.

        The file is read once into fresh memory and hashed as it is read, so the tensors are
        exactly the bytes verified and nothing done to the file later changes them; with ``mmap``
        they are views of a memory map instead (see :func:`_mapped`). On a ``device`` other than
        the CPU they are one copy of those verified bytes. A cached copy that no longer matches
        its digest (a disk fault, a hand edit) is deleted and fetched again, once."""
        return self._repairing(part, lambda: self._read(label, part, verify=verify, mmap=mmap, device=device))

    def stream(self, label: str, part: Part, writer: Callable[[dict[str, HeaderEntry]], Writer]) -> None:
        """Read the part once, in bounded pieces each hashed by a second thread, and hand every
        piece after the header to ``write(offset in the file, piece)``, where ``write`` is what
        ``writer(header)`` returns once the header is parsed and checked against the manifest.

        The piece handed to ``write`` is exactly the bytes hashed, but the part's digest is known
        only once the last piece is read: a part that fails it is an :class:`IntegrityError`
        raised *after* ``write`` saw its bytes, so the caller must keep what it wrote where
        nothing uses it until this returns. A cached copy that fails is fetched again and
        streamed once more (``write`` then gets every offset again)."""
        self._repairing(part, lambda: self._stream(label, part, writer))

    def _stream(self, label: str, part: Part, writer: Callable[[dict[str, HeaderEntry]], Writer]) -> None:
        with (
            self._held(label, part) as (path, where),
            open(path, "rb", buffering=0) as file,
            ThreadPoolExecutor(1, "sepstore-hash") as hashing,
        ):
            head = bytearray(8)
            _fill(file, memoryview(head), part, where)
            head += bytes(header_end(head, part.size) - 8)
            _fill(file, memoryview(head)[8:], part, where)
            header = parse_header(head, part.size, where=where)
            check_header(header, part, where)
            write = writer(header)
            whole = Hasher()
            whole.update(head)
            # Two pieces in turn: one is read and written while the other is hashed.
            pieces = [memoryview(bytearray(min(READ_PIECE, part.size))) for _ in range(2)]
            hashed: list[Future[None] | None] = [None, None]
            for n, at in enumerate(range(len(head), part.size, READ_PIECE)):
                if (busy := hashed[n % 2]) is not None:
                    busy.result()
                piece = pieces[n % 2][: min(READ_PIECE, part.size - at)]
                _fill(file, piece, part, where)
                hashed[n % 2] = hashing.submit(whole.update, piece)
                write(at, piece)
            for busy in hashed:
                if busy is not None:
                    busy.result()
        _compare(digest_of(whole), part.digest, where, "digest")

    def check(self, label: str, part: Part) -> None:
        """Check a part as :meth:`read` does and every tensor's digest too, without torch; an
        :class:`IntegrityError` (or :class:`NotFoundError`) says what is wrong."""
        self._repairing(part, lambda: self._check(label, part))

    def _repairing(self, part: Part, attempt: Callable[[], T]) -> T:
        try:
            return attempt()
        except IntegrityError:
            if self.cache is None or part.digest in self._fresh:
                raise
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cache.path(part))
            return attempt()

    @contextlib.contextmanager
    def _held(self, label: str, part: Part) -> Iterator[tuple[str, str]]:
        """The part located (see :meth:`_located`) and, from the cache, kept there while the block
        reads it: its lock is held shared (``cache prune`` skips it) and it is marked used. A part
        pruned between its fetch and the lock is fetched again."""
        if self.cache is None:
            yield self._located(label, part)
            return
        for _ in range(_ATTEMPTS):
            self.prefetch([(label, part)], desc=f"fetch {label}")
            with self.cache.reading(part):
                if self.cache.has(part):
                    yield self._located(label, part)
                    return
        raise NotFoundError(
            f"part {label} of {self.resolved.url} was removed from the cache {self.cache.root} each of the "
            f"{_ATTEMPTS} times it was fetched; is another process pruning the cache to less than this model needs?"
        )

    def _located(self, label: str, part: Part) -> tuple[str, str]:
        """The part's local path once its size is right, and how errors name it."""
        path = self.path(part)
        where = f"part {label} ({path})"
        size = _size_of(path)
        if size is None:
            raise NotFoundError(f"part {label} of {self.resolved.url} is missing: {path}")
        if wrong := _wrong_size(size, part):
            raise IntegrityError(f"{where}: {wrong}")
        return path, where

    def recheck(self, chosen: Iterable[tuple[str, Blob]], *, rehash: bool = False) -> dict[str, str]:
        """Check the chosen parts (or assets) already on local disk: their size, and with ``rehash`` their
        digest too. A cached copy that fails is deleted, to be fetched again; returns what was
        wrong with each, by label. In a local store, a part that fails (or is missing) is an
        :class:`IntegrityError` (:class:`NotFoundError`): there is nowhere to fetch it from."""
        broken: dict[str, str] = {}
        for label, part in {part.file_name: (label, part) for label, part in chosen}.values():
            path = self.path(part)
            size = _size_of(path)
            if size is None and self.cache is None:
                raise NotFoundError(f"part {label} of {self.resolved.url} is missing: {path}")
            if size is None:
                continue  # not cached yet: fetched, and verified, next
            wrong = _wrong_size(size, part)
            if wrong is None and rehash and (got := digest_file(path)) != part.digest:
                wrong = f"digest is {got}, manifest says {part.digest}"
            if wrong is None:
                continue
            if self.cache is None:
                raise IntegrityError(f"part {label} ({path}): {wrong}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            broken[label] = wrong
        return broken

    def _check(self, label: str, part: Part) -> None:
        """One pass over the file in bounded pieces: the file's digest, then its header, then
        every tensor's digest (no memory map, so a file truncated meanwhile is an error, not a crash)."""
        with self._held(label, part) as (path, where), open(path, "rb", buffering=0) as file:
            head = bytearray(8)
            _fill(file, memoryview(head), part, where)
            head += bytes(header_end(head, part.size) - 8)
            _fill(file, memoryview(head)[8:], part, where)
            try:
                header, broken = parse_header(head, part.size, where=where), None
            except IntegrityError as exc:
                header, broken = {}, exc
            whole = Hasher()
            whole.update(head)
            spans = sorted((entry.start, entry.end, name, Hasher()) for name, entry in header.items())
            piece = memoryview(bytearray(min(READ_PIECE, part.size)))
            for at in range(len(head), part.size, READ_PIECE):
                data = piece[: min(READ_PIECE, part.size - at)]
                _fill(file, data, part, where)
                whole.update(data)
                for start, end, _, hasher in spans:  # the tensors tile the data: few overlap a piece
                    if start < at + len(data) and end > at:
                        hasher.update(data[max(start - at, 0) : min(end - at, len(data))])
        _compare(digest_of(whole), part.digest, where, "digest")
        if broken is not None:
            raise broken
        check_header(header, part, where)
        for _, _, name, hasher in spans:
            _compare(digest_of(hasher), part.tensors[name].digest, where, f"tensor {name!r} digest")

    def _read(
        self, label: str, part: Part, *, verify: bool, mmap: bool, device: torch.device | None
    ) -> dict[str, torch.Tensor]:
        from .tensors import DTYPES

        received = None if mmap else self._received.pop(part.digest, None)  # once: a second read gets its own copy
        if received is not None:  # its verified bytes are in memory already
            data, where = received, f"part {label} ({self.path(part)})"
        else:
            with self._held(label, part) as (path, where):
                # a part this reader fetched was hashed as it arrived, on its way into the cache: not again
                verify = verify and part.digest not in self._fresh
                data = _mapped(path, part, where) if mmap else _copied(path, part, where, verify=verify)
                if mmap and verify:
                    _compare(digest_buffer(memoryview(data.numpy())), part.digest, where, "digest")
        header = parse_header(memoryview(data.numpy()), part.size, where=where)
        check_header(header, part, where)
        if device is not None and device.type != "cpu":
            data = data.to(device)  # the verified bytes themselves, in one transfer
        tensors: dict[str, torch.Tensor] = {}
        for name, entry in header.items():
            dtype = DTYPES[entry.dtype]
            raw = data[entry.start : entry.end]
            if entry.start % dtype.itemsize:
                raw = raw.clone()  # misaligned (not written by sepstore): one copy to align it
            tensors[name] = raw.view(dtype).reshape(entry.shape)
        return dict(sorted(tensors.items()))


def _page_aligned(size: int) -> torch.Tensor:
    """``size`` bytes of fresh memory starting at a page boundary, so that the cache file can be
    written straight from it, past the page cache (:class:`~sepstore.directio.DirectFile`)."""
    import torch

    memory = torch.empty(size + ALIGN, dtype=torch.uint8)
    skip = aligned_start(memory.data_ptr())
    memory[:skip].zero_()  # the tensors' storage is this whole allocation (torch.save writes it all):
    memory[skip + size :].zero_()  # its bytes beyond the part are zeros, not what the heap held before
    return memory[skip : skip + size]


def _compare(got: str, expected: str, where: str, what: str) -> None:
    if got != expected:
        raise IntegrityError(f"{where}: {what} is {got}, manifest says {expected}")


def _fill(file: FileIO, into: memoryview, part: Part, where: str) -> None:
    """Fill ``into`` with the file's next bytes; a file that ends first (truncated since its size
    was checked) is an :class:`IntegrityError`."""
    done = 0
    while done < len(into):
        n = file.readinto(into[done:])
        if not n:
            raise IntegrityError(f"{where}: file ended at byte {file.tell()}, manifest says {part.size} bytes")
        done += n


def _copied(path: str, part: Part, where: str, *, verify: bool) -> torch.Tensor:
    """The part's bytes read into fresh memory in pieces, each hashed (if ``verify``) by a second
    thread right after it is read: the digest is of exactly these bytes, and no one else can
    change them."""
    import torch

    data = torch.empty(part.size, dtype=torch.uint8)
    hasher = Hasher()
    with open(path, "rb", buffering=0) as file, ThreadPoolExecutor(1, "sepstore-hash") as hashing:
        whole = memoryview(data.numpy())
        hashed = []
        for at in range(0, part.size, READ_PIECE):
            piece = whole[at : at + READ_PIECE]
            _fill(file, piece, part, where)
            if verify:  # one thread: the pieces are hashed in order
                hashed.append(hashing.submit(hasher.update, piece))
        for future in hashed:
            future.result()
    if verify:
        _compare(digest_of(hasher), part.digest, where, "digest")
    return data


def _mapped(path: str, part: Part, where: str) -> torch.Tensor:
    """The part's bytes as a copy-on-write memory map of the file (``mmap=True``).

    Its tensors stay valid only while the file is not written to or truncated: another writer's
    bytes would show through, and a truncation kills the process with SIGBUS. So the file must be
    one that only this user (or root) can change, as its permissions show.
    """
    import torch

    with open(path, "rb") as file:
        info = os.fstat(file.fileno())
        if info.st_mode & 0o022 or info.st_uid not in (os.getuid(), 0):
            who = "other users can write to it" if info.st_mode & 0o022 else f"it belongs to user {info.st_uid}"
            raise StoreError(
                f"{where}: mmap=True maps only part files that no other user can change, but {who}; "
                "load without mmap=True (the bytes are then copied), or make the file private"
            )
        try:
            mapped = mmap_module.mmap(file.fileno(), part.size, access=mmap_module.ACCESS_COPY)
        except ValueError:  # shorter than part.size: truncated since its size was checked
            raise IntegrityError(f"{where}: file is shorter than the {part.size} bytes the manifest says") from None
    return torch.frombuffer(mapped, dtype=torch.uint8)
