"""Stores over fsspec filesystems: object stores (S3, ``memory://``, any fsspec URL) and read-only HTTP.
Each upload to an object store is atomic; S3 also writes manifests conditionally (``If-None-Match``,
``If-Match``) and copies ranges server-side (:mod:`sepstore.compose`). Local disk is :mod:`.local`."""

from __future__ import annotations

import asyncio
import contextlib
import os
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

from ..backends import RangeBody, open_range, open_url
from ..errors import NotFoundError, StoreError
from ..hashing import digest_file, digest_hex
from ..manifest import Blob
from ..store import (
    KEY_ID_RE,
    LEASE_ID_PATTERN,
    LEASES_DIR,
    MANIFESTS_DIR,
    NAME_RE,
    PARTS_DIR,
    SIGNATURES_DIR,
    TAG_RE,
    TEMP_PATTERN,
    backend_call,
    backend_errors,
    check_name,
    check_tag,
    read_limited,
    s3_code,
)
from .base import Blobs, Store

if TYPE_CHECKING:
    from .s3 import Check, Run

__all__ = ["FsspecStore", "HttpStore", "PartsFolder"]


class _FileBlobs(Blobs):
    """Blobs as files on an fsspec filesystem (``fs``), each at :meth:`blob_path`."""

    fs: fsspec.AbstractFileSystem

    @abstractmethod
    def blob_path(self, blob: Blob) -> str:
        """Where a part's or an asset's file is, as a path on ``fs``."""

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def local_path(self, blob: Blob) -> str:
        return self.blob_path(blob) if self.local else super().local_path(blob)

    def blob_size(self, blob: Blob) -> int | None:
        path = self.blob_path(blob)

        def size() -> int | None:
            self.fs.invalidate_cache(path)
            try:
                return int(self.fs.size(path))
            except FileNotFoundError:
                return None

        return backend_call(self.fs, self.blob_url(blob), size)

    def open_blob_range(self, blob: Blob, start: int, end: int) -> RangeBody:
        return open_range(self.fs, self.blob_path(blob), start, end)

    def read_blob_range(self, blob: Blob, start: int, end: int) -> bytes:
        with backend_errors(self.blob_url(blob)):
            return super().read_blob_range(blob, start, end)

    def digest_blob(self, blob: Blob) -> str:
        """Local files are hashed with BLAKE3's multithreaded mode, others streamed."""
        with backend_errors(self.blob_url(blob)):
            return digest_file(self.blob_path(blob)) if self.local else super().digest_blob(blob)


class PartsFolder(_FileBlobs):
    """A folder of part and asset files named as in a store's ``parts/blake3/`` (a mirror's,
    ``parts_url=``, or the one a manifest's ``parts`` names), on any fsspec filesystem; read only."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/") or url
        self.fs, root = open_url(self.url, storage_options)
        self.root: str = root.rstrip("/") or root

    @property
    def parts_url(self) -> str:
        return self.url

    def blob_path(self, blob: Blob) -> str:
        return f"{self.root}/{blob.file_name}"

    def blob_url(self, blob: Blob) -> str:
        return f"{self.url}/{blob.file_name}"


class FsspecStore(_FileBlobs, Store):
    """A store rooted at ``url`` on an fsspec filesystem (``s3://``, ``memory://``, ...)."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        location = os.fspath(url) if isinstance(url, str | os.PathLike) else None
        if not isinstance(location, str) or not location:
            raise StoreError(f"a store location is a path or URL, got {url!r}")
        self.fs: fsspec.AbstractFileSystem
        self.fs, root = open_url(location, storage_options)
        self.root: str = root.rstrip("/") or root
        self.url: str = self.url_of(self.root)

    @property
    def _protocols(self) -> tuple[str, ...]:
        protocol = self.fs.protocol
        return protocol if isinstance(protocol, tuple) else (protocol,)

    @property  # type: ignore[override]
    def conditional_writes(self) -> bool:
        """Whether the backend replaces an object only if it is unchanged (S3's ``If-Match``)."""
        return "s3" in self._protocols

    @property  # type: ignore[override]
    def server_side_copy(self) -> bool:
        """S3 assembles a part from ranges of the parts it holds (:mod:`sepstore.compose`)."""
        return "s3" in self._protocols

    # -- locations -------------------------------------------------------------------------------

    def _path(self, *segments: str) -> str:
        return "/".join((self.root, *segments))

    def url_of(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    @property
    def parts_dir(self) -> str:
        """The parts folder, as a path on this store's filesystem."""
        return self._path(PARTS_DIR)

    @property
    def leases_dir(self) -> str:
        """The leases folder (see :mod:`sepstore.leases`), as a path on this store's filesystem."""
        return self._path(LEASES_DIR)

    @property
    def manifests_dir(self) -> str:
        """The manifests folder, as a path on this store's filesystem."""
        return self._path(MANIFESTS_DIR)

    @property
    def parts_url(self) -> str:
        return self.url_of(self.parts_dir)

    def part_path(self, digest: str) -> str:
        return self._path(PARTS_DIR, f"{digest_hex(digest)}.safetensors")

    def blob_path(self, blob: Blob) -> str:
        """Where a part's or an asset's file is filed, as a path on this store's filesystem."""
        return self._path(PARTS_DIR, blob.file_name)

    def blob_url(self, blob: Blob) -> str:
        return self.url_of(self.blob_path(blob))

    def manifest_path(self, name: str, tag: str) -> str:
        return self._path(MANIFESTS_DIR, check_name(name), f"{check_tag(tag)}.json")

    def manifest_url(self, name: str, tag: str) -> str:
        return self.url_of(self.manifest_path(name, tag))

    # -- parts and assets ------------------------------------------------------------------------

    def _exists(self, path: str) -> bool:
        """Whether ``path`` exists now: object stores' cached listings may predate other writers."""

        def exists() -> bool:
            self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))

        return backend_call(self.fs, self.url_of(path), exists)

    def has_blob(self, blob: Blob) -> bool:
        return self._exists(self.blob_path(blob))

    def _place(self, tmp: str, final: str) -> None:
        """Upload the local file ``tmp`` as ``final`` (atomic on object stores)."""
        self.fs.put_file(tmp, final)

    def _reused(self, final: str) -> None:
        """A file the store holds is relied on again (local disk restarts its gc grace period)."""

    def _commit(
        self, tmp: str, blob: Blob, *, protect: Callable[[str], None] | None = None, replace: bool = False
    ) -> bool:
        """File the local file ``tmp`` as ``blob`` unless the store has it (or ``replace``);
        whether it was written. ``protect(digest)`` runs first, before the file is looked for: a
        publisher's lease names the digest before it relies on the file (see :mod:`sepstore.leases`)."""
        if self.read_only:
            raise self.lacks("writes", "store a part or an asset")
        if protect is not None:
            protect(blob.digest)
        final = self.blob_path(blob)
        if not replace and self._exists(final):
            self._reused(final)
            return False
        backend_call(self.fs, self.url_of(final), lambda: self._place(tmp, final))
        return True

    def commit_blob(self, tmp: str, blob: Blob, *, protect: Callable[[str], None] | None = None) -> bool:
        """As :meth:`Store.commit_blob`, but on local disk the staged file itself is renamed into place."""
        try:
            return self._commit(tmp, blob, protect=protect)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_blob_file(self, path: str, blob: Blob, *, replace: bool = False) -> bool:
        return self._commit(path, blob, replace=replace)

    def copy_blob_from(self, source: Store, blob: Blob) -> bool:
        """Copy the blob server-side (S3's ``CopyObject``) from ``source`` when it is another store on
        the same object store (same filesystem type and options) that holds it with the blob's size."""
        if (
            not self.server_side_copy
            or not isinstance(source, FsspecStore)
            or type(source.fs) is not type(self.fs)
            or source.fs.storage_options != self.fs.storage_options
            or source.url == self.url
            or source.blob_size(blob) != blob.size
        ):
            return False
        final = self.blob_path(blob)
        backend_call(self.fs, self.url_of(final), lambda: self.fs.copy(source.blob_path(blob), final))
        if self.blob_size(blob) == blob.size:
            return True
        self.remove_blob(blob)  # the source changed meanwhile: nothing is left under the blob's name
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
        """File the local, verified file ``path`` as ``blob`` composed server-side: each of ``runs``
        copied from the part (by digest) that this store holds, or uploaded from ``path``, as
        :func:`~sepstore.stores.s3.compose_object` does (``check`` judges each part's ETag; a failure
        leaves nothing filed). Where the store lacks :attr:`server_side_copy`, a :class:`StoreError`."""
        if not self.server_side_copy:
            raise self.lacks("server-side copy", "compose a part from ranges of others")
        from .s3 import compose_object

        sync(
            self.fs.loop,
            compose_object,
            self.fs,
            self.blob_path(blob),
            runs,
            source_path=self.part_path,
            local=path,
            workers=workers,
            buffers=buffers,
            check=check,
            sent=sent,
        )

    def remove(self, path: str) -> None:
        if not self.can_delete:
            raise self.lacks("deletion", "delete files")

        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

        backend_call(self.fs, self.url_of(path), remove)

    def remove_blob(self, blob: Blob) -> None:
        self.remove(self.blob_path(blob))

    def list_blobs(self) -> list[dict[str, Any]]:
        """Every entry of the parts folder, and the temporary files a killed publisher left among the
        manifests (``manifests/<name>/.tmp-*.json``; a ``.lock`` file exists only while a process holds
        it, so it stays) and the leases."""
        entries = list(self.list_files(self.parts_dir).values())
        for folder in (self.manifests_dir, self.leases_dir):
            found = self.list_files(folder, recursive=True).values()
            entries += [info for info in found if TEMP_PATTERN.match(str(info["name"]).rsplit("/", 1)[-1])]
        return entries

    def entry(self, path: str) -> dict[str, Any] | None:
        def info() -> dict[str, Any] | None:
            self.fs.invalidate_cache(path)
            try:
                return {**self.fs.info(path), "name": path}
            except FileNotFoundError:
                return None

        return backend_call(self.fs, self.url_of(path), info)

    # -- leases ----------------------------------------------------------------------------------

    def lease_path(self, lease_id: str) -> str:
        if not LEASE_ID_PATTERN.match(lease_id):
            raise StoreError(f"invalid lease id {lease_id!r}")
        return f"{self.leases_dir}/{lease_id}.json"

    def lease_url(self, lease_id: str) -> str:
        return self.url_of(self.lease_path(lease_id))

    def put_lease(self, lease_id: str, data: bytes) -> None:
        """Write (or replace) a lease object atomically. Not fsynced: a lease matters only while
        the process that wrote it runs."""
        path = self.lease_path(lease_id)
        backend_call(self.fs, self.url_of(path), lambda: self.fs.pipe_file(path, data))

    def read_lease(self, lease_id: str) -> bytes | None:
        path = self.lease_path(lease_id)
        try:
            return read_limited(self.fs, path, self.url_of(path))
        except NotFoundError:
            return None

    def list_leases(self) -> list[str]:
        found = self.list_files(self.leases_dir)
        ids = (str(path).rstrip("/").rsplit("/", 1)[-1].removesuffix(".json") for path in found)
        return sorted(i for i in ids if LEASE_ID_PATTERN.match(i))

    def delete_lease(self, lease_id: str) -> None:
        self.remove(self.lease_path(lease_id))

    # -- manifests -------------------------------------------------------------------------------

    def read_manifest_bytes(self, name: str, tag: str) -> bytes:
        path = self.manifest_path(name, tag)
        return read_limited(self.fs, path, self.url_of(path))

    def _etag(self, path: str) -> str:
        def etag() -> str:
            self.fs.invalidate_cache(path)
            return str(self.fs.info(path)["ETag"])

        return backend_call(self.fs, self.url_of(path), etag)

    def read_manifest_version(self, name: str, tag: str) -> tuple[bytes, str | None]:
        """The tag's manifest and its S3 ETag (``None`` on backends that cannot replace conditionally)."""
        if not self.conditional_writes:
            return self.read_manifest_bytes(name, tag), None
        path = self.manifest_path(name, tag)
        for _ in range(5):
            before = self._etag(path)
            data = self.read_manifest_bytes(name, tag)
            if self._etag(path) == before:
                return data, before
        raise StoreError(f"{self.url_of(path)} keeps changing while it is read; try again later")

    def write_manifest_bytes(
        self, name: str, tag: str, data: bytes, *, create: bool = False, if_version: str | None = None
    ) -> bool:
        """Write a manifest atomically. With ``create``, only if the tag holds none yet (a conditional
        ``If-None-Match`` PUT on S3; other object stores check, then write); with ``if_version``, only
        if the manifest is still that version (S3's ``If-Match``). A write refused because the tag
        already holds these very bytes counts as written: a try whose answer was lost (a 503 or a
        dropped connection after S3 stored it) wrote them, and its retry was refused."""
        if self.read_only:
            raise self.lacks("writes", "write a manifest")
        path = self.manifest_path(name, tag)

        def write() -> bool:
            try:
                if if_version is not None:
                    self.fs.pipe_file(path, data, IfMatch=if_version)
                else:
                    self.fs.pipe_file(path, data, mode="create" if create else "overwrite")
            except FileExistsError:
                return False
            except OSError as exc:
                if s3_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
            return True

        if backend_call(self.fs, self.url_of(path), write):
            return True
        try:
            return self.read_manifest_bytes(name, tag) == data
        except NotFoundError:  # deleted since
            return False

    def require(self) -> None:
        if not self._exists(self.root):
            raise NotFoundError(f"{self.url}: no store there (no such folder or bucket)")

    def has_manifest(self, name: str, tag: str) -> bool:
        return self._exists(self.manifest_path(name, tag))

    def manifest_entries(self) -> dict[tuple[str, str], dict[str, Any]]:
        base = self.manifests_dir
        if not self.can_list:
            raise StoreError(
                f"{self.url}: an HTTP server's folders are not listed (a listing is unbounded); name the model: "
                f"the manifest's URL ({self.url}/{MANIFESTS_DIR}/<name>/<tag>.json), or name= (--name) and tag= (--tag)"
            )
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for path, info in self.list_files(base, recursive=True).items():
            relative = path[len(base) :].strip("/")
            name, _, filename = relative.rpartition("/")
            tag, dot, ext = filename.rpartition(".")
            if dot and ext == "json" and not tag.startswith(".") and NAME_RE.match(name) and TAG_RE.match(tag):
                out[name, tag] = info
        return out

    # -- signatures ------------------------------------------------------------------------------

    @property
    def signatures_root(self) -> str:
        """The signatures folder, as a path on this store's filesystem."""
        return self._path(SIGNATURES_DIR)

    def signatures_dir(self, name: str, tag: str) -> str:
        """The folder of a tag's signatures, one ``<key id>.json`` per signer."""
        return f"{self.signatures_root}/{check_name(name)}/{check_tag(tag)}"

    def signature_path(self, name: str, tag: str, key_id: str) -> str:
        if not KEY_ID_RE.match(key_id):
            raise StoreError(f"invalid key id {key_id!r}: 64 lowercase hex digits")
        return f"{self.signatures_dir(name, tag)}/{key_id}.json"

    def signature_url(self, name: str, tag: str, key_id: str) -> str:
        return self.url_of(self.signature_path(name, tag, key_id))

    def signatures_url(self, name: str, tag: str) -> str:
        return self.url_of(self.signatures_dir(name, tag))

    def read_signature_bytes(self, name: str, tag: str, key_id: str) -> bytes:
        path = self.signature_path(name, tag, key_id)
        return read_limited(self.fs, path, self.url_of(path))

    def write_signature_bytes(self, name: str, tag: str, key_id: str, data: bytes) -> None:
        """Write a signature atomically (an object store's upload), replacing that key's previous one."""
        if self.read_only:
            raise self.lacks("writes", "write a signature")
        path = self.signature_path(name, tag, key_id)
        backend_call(self.fs, self.url_of(path), lambda: self.fs.pipe_file(path, data))

    def list_signatures(self, name: str, tag: str) -> list[str]:
        found = self.list_files(self.signatures_dir(name, tag))
        ids = (str(path).rstrip("/").rsplit("/", 1)[-1].removesuffix(".json") for path in found)
        return sorted(i for i in ids if KEY_ID_RE.match(i))

    def signature_files(self) -> dict[str, tuple[str, str, str, dict[str, Any]]]:
        root = self.signatures_root
        out: dict[str, tuple[str, str, str, dict[str, Any]]] = {}
        for path, info in self.list_files(root, recursive=True).items():
            folder, _, base = path[len(root) :].strip("/").rpartition("/")
            name, _, tag = folder.rpartition("/")
            out[path] = (name, tag, base, info)
        return out

    def list_files(self, folder: str, *, recursive: bool = False) -> dict[str, dict[str, Any]]:
        """The files in ``folder`` (and below it, if ``recursive``) as the backend lists them now,
        each with its details; none when there is no such folder. A :class:`StoreError` where the
        store cannot list (HTTP)."""
        if not self.can_list:
            raise self.lacks("listing", f"list {self.url_of(folder)} (an HTTP server's listing is unbounded)")

        def listing() -> dict[str, dict[str, Any]]:
            self.fs.invalidate_cache(folder)
            try:
                if recursive:
                    return dict(self.fs.find(folder, detail=True))
                return {str(info["name"]): info for info in self.fs.ls(folder, detail=True)}
            except FileNotFoundError:
                return {}

        return backend_call(self.fs, self.url_of(folder), listing)


class HttpStore(FsspecStore):
    """A store served over HTTP(S): read-only, and not listed (an HTTP server's "listings" are HTML
    pages that fsspec reads whole, with no size bound and no minimum-progress rule). Read a model by
    its manifest's URL, or by name and tag."""

    can_list = False
    can_list_blobs = False
    can_delete = False
    read_only = True

    def put_lease(self, lease_id: str, data: bytes) -> None:
        raise self.lacks("writes", "hold a lease")

    def list_leases(self) -> list[str]:
        return []  # nothing can be written, so no publisher holds a lease here

    def list_blobs(self) -> list[dict[str, Any]]:
        raise self.lacks(
            "listing",
            "list its parts, so gc cannot find unreferenced ones: run gc where the store can be listed, on the "
            "machine or bucket that serves it (its folder or s3:// URL)",
        )

    def signature_files(self) -> dict[str, tuple[str, str, str, dict[str, Any]]]:
        raise self.lacks("listing", "list its signatures")
