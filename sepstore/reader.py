"""Opening one part: locate its bytes (store or cache), verify them, and return its tensors.

A local part file is memory-mapped once (copy-on-write, so a caller writing to a tensor never
touches the file); the digest is computed from that same mapping with BLAKE3's threads and the
tensors are views into it, so a verified load reads each byte once and copies nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from mmap import ACCESS_READ, mmap
from typing import TYPE_CHECKING, TypeVar

from fsspec.implementations.local import LocalFileSystem

from .cache import DEFAULT_WORKERS, Cache, Fetch
from .errors import IntegrityError, NotFoundError, StoreError
from .hashing import digest_buffer, digest_hex
from .manifest import Part
from .progress import progress
from .refs import Resolved, open_fs
from .safetensors_io import HeaderEntry, parse_header

if TYPE_CHECKING:
    import torch

__all__ = ["PartReader", "check_header"]

T = TypeVar("T")


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
        self.fs, self.base = open_fs(resolved.parts_url, resolved.storage_options)
        self.cache = None if isinstance(self.fs, LocalFileSystem) else Cache(cache_dir)
        self.workers = workers
        self._fresh: set[str] = set()  # digests this reader fetched, and so verified, itself

    def _source(self, part: Part) -> str:
        return f"{self.base}/{digest_hex(part.digest)}.safetensors"

    def path(self, part: Part) -> str:
        """Where the part's bytes are (or will be) on local disk."""
        return self._source(part) if self.cache is None else self.cache.path(part.digest)

    def missing(self, chosen: Iterable[tuple[str, Part]]) -> list[Fetch]:
        """The chosen parts that are neither local nor cached yet."""
        if self.cache is None:
            return []
        fetches = {
            part.digest: Fetch(self.fs, self._source(part), self.resolved.part_url(part), part, label)
            for label, part in chosen
            if not self.cache.has(part.digest)
        }
        return list(fetches.values())

    def prefetch(self, chosen: Iterable[tuple[str, Part]], *, desc: str = "fetch", quiet: bool = False) -> list[Fetch]:
        """Fetch the chosen parts the cache lacks, in parallel; returns what was fetched."""
        todo = self.missing(chosen)
        if not todo or self.cache is None:
            return []
        with progress(sum(f.part.size for f in todo), desc, quiet=quiet) as bar:
            fetched = self.cache.fetch(todo, workers=self.workers, bar=bar)
        self._fresh.update(f.part.digest for f in fetched)
        return fetched

    def read(self, label: str, part: Part, *, verify: bool = True) -> dict[str, torch.Tensor]:
        """The part's tensors on the CPU, sorted by name, after checking size, digest and header.

        A cached copy that no longer matches its digest (a disk fault, a hand edit) is deleted
        and fetched again, once."""
        return self._repairing(part, lambda: self._read(label, part, verify=verify))

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
                os.unlink(self.cache.path(part.digest))
            return attempt()

    def _locate(self, label: str, part: Part) -> tuple[str, str]:
        """The part's local path (fetched first if need be) once its size is right, and how
        errors name it."""
        self.prefetch([(label, part)], desc=f"fetch {label}")
        path = self.path(part)
        where = f"part {label} ({path})"
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise NotFoundError(f"part {label} of {self.resolved.url} is missing: {path}") from None
        if size != part.size:
            raise IntegrityError(f"{where}: file is {size} bytes, manifest says {part.size}")
        return path, where

    def _header(self, data: memoryview, part: Part, where: str, *, verify: bool) -> dict[str, HeaderEntry]:
        """The part's header, once its digest (unless fetched and so checked in this call, or not
        ``verify``) and its header match the manifest."""
        if verify and part.digest not in self._fresh:
            got = digest_buffer(data)
            if got != part.digest:
                raise IntegrityError(f"{where}: digest is {got}, manifest says {part.digest}")
        header = parse_header(data, part.size, where=where)
        check_header(header, part, where)
        return header

    def _check(self, label: str, part: Part) -> None:
        path, where = self._locate(label, part)
        with (
            open(path, "rb") as file,
            mmap(file.fileno(), 0, access=ACCESS_READ) as mapped,
            memoryview(mapped) as data,
        ):
            for name, entry in self._header(data, part, where, verify=True).items():
                with data[entry.start : entry.end] as raw:
                    got = digest_buffer(raw)
                if got != part.tensors[name].digest:
                    raise IntegrityError(
                        f"{where}: tensor {name!r} digest is {got}, manifest says {part.tensors[name].digest}"
                    )

    def _read(self, label: str, part: Part, *, verify: bool) -> dict[str, torch.Tensor]:
        import torch

        from .tensors import DTYPES

        path, where = self._locate(label, part)
        storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=part.size)
        data = torch.empty(0, dtype=torch.uint8).set_(storage)
        header = self._header(memoryview(data.numpy()), part, where, verify=verify)
        tensors: dict[str, torch.Tensor] = {}
        for name, entry in header.items():
            dtype = DTYPES[entry.dtype]
            raw = data[entry.start : entry.end]
            if entry.start % dtype.itemsize:
                raw = raw.clone()  # misaligned (not written by sepstore): one copy to align it
            tensors[name] = raw.view(dtype).reshape(entry.shape)
        return dict(sorted(tensors.items()))
