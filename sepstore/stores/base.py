"""The store interface: what ``dump``, ``push``, ``pull`` and ``gc`` may ask of a store, and which of
it each home can do (capability flags), so callers never branch on a backend's type. Its reading
side, :class:`Blobs`, is also what a mirror of parts (``parts_url=``) implements: every read of a
part, by ``load``, ``pull``, ``verify``, ``export`` and the cache, goes through it.

An operation a store lacks raises :class:`~sepstore.errors.StoreError` naming the store and the
capability (see :meth:`Store.lacks`), never a backend's own exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..backends import RangeBody, stream_body
from ..errors import IntegrityError, StoreError
from ..hashing import Hasher, digest_of
from ..manifest import Blob
from ..retry import with_retries

if TYPE_CHECKING:
    from .s3 import Check, Run

__all__ = ["CAPABILITIES", "Blobs", "Store", "algorithm_name", "open_parts"]

T = TypeVar("T")

#: The capability flags every store sets (class attributes; a store may refine them per instance).
CAPABILITIES = (
    "can_list",
    "can_list_blobs",
    "conditional_writes",
    "ranged_reads",
    "server_side_copy",
    "can_delete",
    "read_only",
)


class Blobs(ABC):
    """Where a manifest's parts and assets are read, by their digest: a store, a mirror's folder of
    part files (``parts_url=``), or a registry repository. Every read of a part goes through
    :meth:`open_blob_range` (one ranged read, its body streamed in bounded pieces); ``load``,
    ``pull``, ``verify``, ``export`` and the cache read parts only through this interface."""

    #: A byte range of a blob can be read without the rest.
    ranged_reads: ClassVar[bool] = True

    url: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @property
    @abstractmethod
    def parts_url(self) -> str:
        """The URL of this location of parts (a manifest's ``parts_url`` when its parts are read here)."""

    @abstractmethod
    def blob_url(self, blob: Blob) -> str:
        """The URL of a part's or an asset's file (for messages, and for tools that download by URL)."""

    @abstractmethod
    def blob_size(self, blob: Blob) -> int | None:
        """The size of the file filed under the blob's digest, or ``None`` when there is none."""

    def has_blob(self, blob: Blob) -> bool:
        """Whether a file is filed under the blob's digest now."""
        return self.blob_size(blob) is not None

    @property
    def local(self) -> bool:
        """Whether the blobs are files on this machine's disk, read in place (not through a cache)."""
        return False

    def local_path(self, blob: Blob) -> str:
        """The blob's file on this machine's disk (where :attr:`local`)."""
        raise StoreError(f"{self.blob_url(blob)} is not on this machine's disk")

    @abstractmethod
    def open_blob_range(self, blob: Blob, start: int, end: int) -> RangeBody:
        """One read of bytes ``start:end`` of the blob's file, its body unread: a ranged answer, or
        the whole file from a server that ignores ``Range``. Not retried, and a backend's failure is
        raised as it is: :meth:`stream_blob_range`'s callers retry, and translate, with
        :func:`~sepstore.retry.with_retries`."""

    def extra_digests(self, blob: Blob) -> dict[str, str]:
        """Digests besides BLAKE3 the blob's bytes must have here, by :mod:`hashlib` name
        (``{"sha256": "sha256:<hex>"}`` in a registry, which names blobs by SHA-256); checked by
        whoever reads the whole blob (the cache, :meth:`digest_blob`)."""
        return {}

    def stream_blob_range(
        self,
        blob: Blob,
        start: int,
        end: int,
        write: Callable[[int, memoryview], None],
        *,
        into: memoryview | None = None,
    ) -> tuple[int, int]:
        """Stream bytes ``start:end`` of the blob into ``write(offset, piece)`` once (see
        :func:`~sepstore.backends.stream_body`: bounded pieces, cut at the expected length, under the
        minimum-progress rule); the span written, ``(0, size)`` when the server sent the whole blob."""
        return stream_body(
            self.open_blob_range(blob, start, end), self.blob_url(blob), start, end, blob.size, write, into=into
        )

    def read_blob_range(self, blob: Blob, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a blob's file, retried from the start on a transient failure."""
        url = self.blob_url(blob)
        if not 0 <= start <= end <= blob.size:
            raise StoreError(f"{url}: range [{start}, {end}) is outside the blob's {blob.size} bytes")
        out = bytearray(end - start)

        def write(offset: int, piece: memoryview) -> None:
            lo, hi = max(offset, start), min(offset + len(piece), end)  # a whole answer holds more
            if lo < hi:
                out[lo - start : hi - start] = piece[lo - offset : hi - offset]

        if end > start:
            with_retries(lambda: self.stream_blob_range(blob, start, end, write), url)
        return bytes(out)

    def digest_blob(self, blob: Blob) -> str:
        """The BLAKE3 of the bytes filed under the blob's digest, read whole in bounded pieces; an
        :class:`~sepstore.errors.IntegrityError` if they lack one of its :meth:`extra_digests`."""
        url = self.blob_url(blob)
        extra = self.extra_digests(blob)
        hasher, others = Hasher(), {name: hashlib.new(name) for name in extra}

        def write(offset: int, piece: memoryview) -> None:
            nonlocal others
            if offset == 0:  # a retry streams again from the start
                hasher.reset()
                others = {name: hashlib.new(name) for name in extra}
            hasher.update(piece)
            for other in others.values():
                other.update(piece)

        if blob.size:
            with_retries(lambda: self.stream_blob_range(blob, 0, blob.size, write), url)
        for name, expected in extra.items():
            got = f"{name}:{others[name].hexdigest()}"
            if got != expected:
                raise IntegrityError(f"{url}: the blob's {algorithm_name(name)} is {got}, not {expected}")
        return digest_of(hasher)

    def intact(self, blob: Blob) -> bool:
        """Whether the bytes filed under the blob's digest re-hash to it (and to its :meth:`extra_digests`)."""
        try:
            return self.digest_blob(blob) == blob.digest
        except IntegrityError:
            return False


def algorithm_name(name: str) -> str:
    """How messages name a :mod:`hashlib` algorithm (``sha256``: SHA-256)."""
    return {"sha256": "SHA-256", "sha512": "SHA-512"}.get(name, name.upper())


def open_parts(url: str, storage_options: Mapping[str, Any] | None = None) -> Blobs:
    """The parts at ``url``: an ``oci://HOST/REPOSITORY`` registry repository, else a folder of
    part files (``<file name>``, as in a store's ``parts/blake3/``) on any fsspec filesystem."""
    if url.startswith("oci://"):
        from .registry import RegistryStore

        return RegistryStore(url, dict(storage_options or {}))
    from .fsspec import PartsFolder

    return PartsFolder(url, storage_options)


class Store(Blobs):
    """A sepstore: parts and assets by BLAKE3 digest, manifests by model name and tag, signatures,
    and the leases that keep ``gc`` from a publish in flight.

    ``Store(url, storage_options)`` opens the implementation for ``url``: an ``oci://HOST/REPOSITORY``
    registry repository, an ``http(s)://`` server (read-only), a local path or ``file://``, or any
    other fsspec URL (``s3://``, ``memory://``)."""

    #: Its models and tags can be listed: not over HTTP.
    can_list: ClassVar[bool] = True
    #: Its blobs (and leases, signature files) can be listed, which ``gc`` needs: not over HTTP nor in a registry.
    can_list_blobs: ClassVar[bool] = True
    #: A manifest is created only if absent, or replaced only if unchanged, atomically.
    conditional_writes: ClassVar[bool] = False
    #: Blobs can be assembled from ranges of other blobs inside the store (S3's UploadPartCopy).
    server_side_copy: ClassVar[bool] = False
    #: Blobs and other files can be deleted (``gc``).
    can_delete: ClassVar[bool] = True
    #: Nothing can be written.
    read_only: ClassVar[bool] = False

    def __new__(cls, url: str | os.PathLike[str] | None = None, *args: Any, **kwargs: Any) -> Store:
        if cls is Store:
            cls = _implementation(url, args[0] if args else kwargs.get("storage_options"))
        return super().__new__(cls)

    @classmethod
    def destination(
        cls, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
    ) -> tuple[Store, str | None]:
        """The store ``url`` names as a place to publish into, and the tag it names too, if any
        (``oci://HOST/REPOSITORY:TAG`` names one; a store's own URL none)."""
        implementation = _implementation(url, storage_options) if cls is Store else cls
        return implementation._publishing_into(url, storage_options)

    @classmethod
    def _publishing_into(
        cls, url: str | os.PathLike[str], storage_options: dict[str, Any] | None
    ) -> tuple[Store, str | None]:
        return cls(url, storage_options), None

    def capabilities(self) -> dict[str, bool]:
        """Every capability flag and its value for this store."""
        return {flag: bool(getattr(self, flag)) for flag in CAPABILITIES}

    def lacks(self, capability: str, doing: str) -> StoreError:
        """The error for an operation this store cannot do: it names the store, what was asked and why."""
        return StoreError(f"{self.url}: {type(self).__name__} cannot {doing} (it lacks {capability})")

    # -- locations, as URLs for messages and references --------------------------------------------

    @abstractmethod
    def url_of(self, path: str) -> str:
        """The URL of a path this store listed (:meth:`list_blobs`, :meth:`signature_files`)."""

    @abstractmethod
    def manifest_url(self, name: str, tag: str) -> str:
        """The URL of a tag's manifest (what ``load`` takes)."""

    @abstractmethod
    def require(self) -> None:
        """A :class:`~sepstore.errors.NotFoundError` when nothing at all is at the store's location."""

    # -- parts and assets ------------------------------------------------------------------------

    @abstractmethod
    def put_blob_file(self, path: str, blob: Blob, *, replace: bool = False) -> bool:
        """File a local, already verified part or asset file as ``blob``; whether it was written here.
        With ``replace``, a file already filed under its digest (found damaged) is replaced."""

    def _staging(self) -> str | None:
        """Where staged files go (``None``: the system's temp folder)."""
        return None

    def stage_blob(self, write: Callable[[int], T]) -> tuple[T, str]:
        """Write a part or an asset with ``write(fd)`` into a new temporary local file (``fd`` is open
        for reading and writing); the result and the file's path, for :meth:`commit_blob`."""
        from ..store import create_temp  # that module imports this one

        fd, tmp = create_temp(self._staging(), ".safetensors")
        try:
            try:
                result = write(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk, a quota: the part being written here
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise StoreError(f"{self.parts_url}: cannot write a part or an asset ({exc})") from exc
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return result, tmp

    def commit_blob(self, tmp: str, blob: Blob, *, protect: Callable[[str], None] | None = None) -> bool:
        """File what :meth:`stage_blob` wrote as ``blob`` (unless the store has it; an existing file
        is never rewritten), and delete the temporary file; whether it was new. ``protect(digest)``
        runs before the store is asked whether it has the file (a publisher's lease names it)."""
        try:
            if protect is not None:
                protect(blob.digest)
            return self.put_blob_file(tmp, blob)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def copy_blob_from(self, source: Store, blob: Blob) -> bool:
        """File ``blob`` by copying it from ``source``'s copy inside the storage, no bytes sent
        (a registry's cross-repository mount); whether it did. ``False`` (the default) where this
        store cannot: the caller uploads it."""
        return False

    def put_blob_composed(
        self,
        path: str,
        blob: Blob,
        runs: Sequence[Run],
        *,
        workers: int,
        buffers: asyncio.Semaphore,
        check: Check,
        sent: Callable[[int], None],
    ) -> None:
        """File the local, verified file ``path`` as ``blob``, composed inside the storage from ranges
        of parts it holds (``runs``, planned by :mod:`sepstore.compose`) and the rest uploaded; only
        where :attr:`server_side_copy` (S3's ``UploadPartCopy``, see :mod:`sepstore.stores.s3`)."""
        raise self.lacks("server-side copy", "compose a part from ranges of others")

    def check_publishable(self, name: str, *, force: bool = False) -> None:
        """Refuse, before anything is uploaded, a model this store may not hold (a registry
        repository holds one model): a :class:`StoreError` saying why. ``force`` lets this store
        object take it anyway, in this call and in its later manifest writes."""
        return None  # any store but a registry repository holds any number of models

    @abstractmethod
    def list_blobs(self) -> list[dict[str, Any]]:
        """Every file of the parts folder (and the temporary files interrupted writers left), each as
        a listing entry with ``name`` (its path in the store), ``size`` and a modification time."""

    @abstractmethod
    def remove_blob(self, blob: Blob) -> None:
        """Delete the file filed under the blob's digest; one already gone is fine."""

    @abstractmethod
    def entry(self, path: str) -> dict[str, Any] | None:
        """A listed file's entry as it is now (``None`` if it is gone), asked right before deleting it."""

    @abstractmethod
    def remove(self, path: str) -> None:
        """Delete a listed file of this store; one already gone is fine."""

    # -- manifests -------------------------------------------------------------------------------

    @abstractmethod
    def read_manifest_bytes(self, name: str, tag: str) -> bytes:
        """A tag's manifest, byte for byte; :class:`~sepstore.errors.NotFoundError` when there is none."""

    def read_manifest_version(self, name: str, tag: str) -> tuple[bytes, str | None]:
        """The tag's manifest and a token for this version of it, for ``write_manifest_bytes(if_version=)``;
        ``None`` where the store cannot replace conditionally."""
        return self.read_manifest_bytes(name, tag), None

    @abstractmethod
    def write_manifest_bytes(
        self, name: str, tag: str, data: bytes, *, create: bool = False, if_version: str | None = None
    ) -> bool:
        """Write a manifest atomically, replacing the tag's previous one; whether it was written. With
        ``create``, only if the tag holds none; with ``if_version``, only if it is still that version
        (atomic where :attr:`conditional_writes`, else checked, then written)."""

    @abstractmethod
    def has_manifest(self, name: str, tag: str) -> bool:
        """Whether the tag holds a manifest now."""

    def list_manifests(self) -> list[tuple[str, str]]:
        """Every ``(name, tag)`` in the store, sorted; a :class:`StoreError` where it cannot list."""
        return sorted(self.manifest_entries())

    @abstractmethod
    def manifest_entries(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every ``(name, tag)`` with its manifest's listing entry (size, modification time, when known)."""

    @contextlib.contextmanager
    def tag_lock(self, name: str, tag: str) -> Iterator[None]:
        """Serialise read-modify-writes of one tag between processes, where the store needs it."""
        yield

    # -- leases (see sepstore.leases) --------------------------------------------------------------

    @abstractmethod
    def lease_url(self, lease_id: str) -> str:
        """The URL of a lease object."""

    @abstractmethod
    def put_lease(self, lease_id: str, data: bytes) -> None:
        """Write (or replace) a lease object atomically."""

    @abstractmethod
    def read_lease(self, lease_id: str) -> bytes | None:
        """A lease object's bytes, or ``None`` when it is gone."""

    @abstractmethod
    def list_leases(self) -> list[str]:
        """The ids of every lease object, as the store lists them now."""

    @abstractmethod
    def delete_lease(self, lease_id: str) -> None:
        """Delete a lease object; one already gone is fine."""

    # -- signatures ------------------------------------------------------------------------------

    @abstractmethod
    def signature_url(self, name: str, tag: str, key_id: str) -> str:
        """The URL of one key's signature of a tag."""

    @abstractmethod
    def signatures_url(self, name: str, tag: str) -> str:
        """Where a tag's signatures are (for messages)."""

    @abstractmethod
    def read_signature_bytes(self, name: str, tag: str, key_id: str) -> bytes:
        """A signature (a bundle's JSON); :class:`~sepstore.errors.NotFoundError` if that key has not signed."""

    @abstractmethod
    def write_signature_bytes(self, name: str, tag: str, key_id: str, data: bytes) -> None:
        """Write a signature, replacing that key's previous one for the tag."""

    @abstractmethod
    def list_signatures(self, name: str, tag: str) -> list[str]:
        """The ids of the keys that signed a tag, sorted."""

    @abstractmethod
    def signature_files(self) -> dict[str, tuple[str, str, str, dict[str, Any]]]:
        """Every file below the signatures folder, by path: ``(name, tag, file name, listing entry)``
        (for ``gc``, which removes those of deleted or replaced manifests)."""


def _implementation(url: object, storage_options: dict[str, Any] | None) -> type[Store]:
    """The store class for ``url`` (imported only when asked, so a registry's client loads only for one)."""
    location = os.fspath(url) if isinstance(url, str | os.PathLike) else ""
    if location.startswith("oci://"):
        from .registry import RegistryStore

        return RegistryStore
    from fsspec.implementations.local import LocalFileSystem

    from ..backends import open_url
    from .fsspec import FsspecStore, HttpStore
    from .local import LocalStore

    if not location:
        return FsspecStore  # which refuses it, naming what was given
    fs = open_url(location, storage_options)[0]
    if isinstance(fs, LocalFileSystem):
        return LocalStore
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return HttpStore if {"http", "https"}.intersection(protocols) else FsspecStore
