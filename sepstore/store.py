"""A sepweight store over any fsspec filesystem: part and asset files by digest, manifests by name and tag.

Layout::

    <root>/parts/blake3/<64 hex>.safetensors    a part
    <root>/parts/blake3/<64 hex>                an asset (format version 2)
    <root>/manifests/<name>/<tag>.json

Writes never leave a partial file under a final name: on local disk a file is written under a
temporary name in the same folder, fsynced, renamed into place and its folder fsynced (so a
power loss leaves it whole or absent, as git and SQLite do); object stores make each upload atomic.
Publishers and gc also keep short-lived lease objects in ``<root>/leases/`` (see :mod:`sepstore.leases`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .backends import can_list, open_url, read_head, stream_range
from .errors import NotFoundError, SepstoreError, StoreError
from .hashing import Hasher, digest_file, digest_hex, digest_of
from .manifest import MAX_MANIFEST_BYTES, NAME_PATTERN, TAG_PATTERN, Blob
from .retry import http_status, with_retries
from .safetensors_io import WRITE_PIECE

__all__ = [
    "BLOB_FILE",
    "LEASE_ID_PATTERN",
    "PARTS_DIR",
    "SIGNATURES_DIR",
    "TEMP_PATTERN",
    "Store",
    "backend_errors",
    "check_name",
    "check_tag",
    "create_temp",
    "fsync_dir",
    "make_dirs",
    "modified_time",
    "read_limited",
    "read_prefix",
    "replace_durably",
    "standard_parts_location",
]

PARTS_DIR = "parts/blake3"
MANIFESTS_DIR = "manifests"
LEASES_DIR = "leases"
#: The names of lease objects, ``leases/<id>.json``: who holds it, then a random part.
LEASE_ID_PATTERN = re.compile(r"^(?:publish|gc)-[0-9a-f]{16}$")
SIGNATURES_DIR = "signatures"
_NAME_RE = re.compile(NAME_PATTERN)
_TAG_RE = re.compile(TAG_PATTERN)
_KEY_ID_RE = re.compile(r"^[0-9a-f]{64}\Z")

T = TypeVar("T")


#: The name of a part (``<hex>.safetensors``) or asset (``<hex>``) file in ``parts/blake3/``; group 1 is the hex.
BLOB_FILE = re.compile(r"^([0-9a-f]{64})(?:\.safetensors)?\Z")

#: What :func:`create_temp` names files (``gc`` removes stale ones by this pattern, nothing else).
TEMP_PATTERN = re.compile(r"^\.tmp-[0-9a-f]{16}\.(?:safetensors|json)$")


def create_temp(folder: str | None, suffix: str) -> tuple[int, str]:
    """Create a new file ``.tmp-<random><suffix>`` in ``folder`` (the system's temp folder if
    ``None``), with the permissions the umask gives (``mkstemp`` would make it private)."""
    folder = folder if folder is not None else tempfile.gettempdir()
    while True:
        path = os.path.join(folder, f".tmp-{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def fsync_dir(folder: str) -> None:
    """Make ``folder``'s entries (a file renamed or linked into it, a new subfolder) survive a power loss."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(folder: str) -> None:
    """``os.makedirs(folder, exist_ok=True)``, with every folder it creates made durable in its parent."""
    created: list[str] = []
    path = os.path.abspath(folder)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    for new in reversed(created):
        fsync_dir(os.path.dirname(new))


def replace_durably(tmp: str, final: str) -> None:
    """Rename the written file ``tmp`` to ``final`` so that after a power loss ``final`` is either
    absent or whole: the file's bytes are fsynced before the rename, its folder after."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))


@contextlib.contextmanager
def staged(path: str, data: bytes) -> Iterator[str]:
    """A temporary file beside ``path`` (its folder made) holding ``data``, fsynced so it is whole
    on disk before it gets a name; deleted after the block unless renamed or linked there."""
    folder = os.path.dirname(path)
    make_dirs(folder)
    fd, tmp = create_temp(folder, ".json")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def file_lock(path: str, *, blocking: bool = True, shared: bool = False) -> Iterator[bool]:
    """An exclusive (or ``shared``) ``flock`` on ``path`` for the ``with`` block; yields whether it
    was taken (always, when ``blocking``). Several processes, or threads, exclude each other; shared
    holders exclude only exclusive ones.

    The lock file exists only while the lock is held: its last holder deletes it before letting go
    (a shared holder deletes it only if it can make its lock exclusive, i.e. no one else holds it),
    and a waiter that then gets the lock on the deleted file sees that the path no longer names it
    and tries again, so no stale ``.lock`` files pile up beside manifests or in the cache.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
                fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                continue  # its holder deleted it while this one waited: lock the next file
            if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                continue
            try:
                yield True
            finally:
                if _last_holder(fd, shared):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            return
        finally:
            os.close(fd)


def _last_holder(fd: int, shared: bool) -> bool:
    """Whether the holder of the lock on ``fd`` is its only one. A shared holder asks by making its
    lock exclusive without waiting; when that fails it has let go of it (``flock`` converts by
    releasing first), and a holder that remains deletes the file instead."""
    if not shared:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def modified_time(info: dict[str, Any]) -> float | None:
    """Modification time of a listing entry, across backends (local ``mtime``, S3 ``LastModified``)."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, dt.datetime):
            return value.timestamp()
    return None


def standard_parts_location(name: str) -> str:
    """The ``parts`` of a manifest stored as ``manifests/<name>/<tag>.json``: relative, up to the root."""
    return "../" * (name.count("/") + 2) + PARTS_DIR


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise StoreError(
            f"invalid model name {name!r}: use segments of letters, digits, '.', '_' and '-' joined by '/' "
            "(e.g. 'meta-llama/Llama-3-8B'), never '.' or '..'"
        )
    return name


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag) or tag.startswith("."):
        raise StoreError(
            f"invalid tag {tag!r}: one segment of letters, digits, '.', '_' and '-', not starting with '.' (e.g. 'v1')"
        )
    return tag


@contextlib.contextmanager
def backend_errors(url: str) -> Iterator[None]:
    """Translate a backend's exceptions into sepstore's, naming ``url``."""
    try:
        yield
    except SepstoreError:
        raise
    except FileNotFoundError as exc:
        if _s3_code(exc) == "NoSuchBucket":
            bucket = url.split("://", 1)[-1].split("/", 1)[0]
            raise NotFoundError(
                f"{url}: the bucket {bucket!r} does not exist; create it first (e.g. `aws s3 mb s3://{bucket}`) "
                "or check the store URL"
            ) from None
        raise NotFoundError(f"{url}: not found") from None
    except NotImplementedError as exc:
        raise StoreError(f"{url}: this backend cannot do that (read-only, such as HTTP?)") from exc
    except Exception as exc:  # a backend's own errors, or its failures on a hostile server's answers
        if http_status(exc) in (405, 501):  # Method Not Allowed, or not implemented (python -m http.server)
            raise StoreError(f"{url}: the server refused to write (HTTP stores are read-only)") from exc
        raise StoreError(f"{url}: {type(exc).__name__}: {exc}") from exc


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code behind an s3fs exception (s3fs keeps botocore's error as the cause)."""
    response = getattr(exc.__cause__, "response", None)
    error = response.get("Error") if isinstance(response, dict) else None
    code = error.get("Code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def read_prefix(fs: fsspec.AbstractFileSystem, path: str, url: str, limit: int) -> bytes:
    """The first ``limit`` bytes of an object (all of it, if shorter), never holding more; from a
    remote backend, transient failures (dropped connections, 5xx, stalls) are retried."""

    def read() -> bytes:
        return read_head(fs, path, url, limit)

    with backend_errors(url):
        return read() if isinstance(fs, LocalFileSystem) else with_retries(read, url)


def read_limited(
    fs: fsspec.AbstractFileSystem, path: str, url: str, limit: int = MAX_MANIFEST_BYTES, *, what: str = "a manifest"
) -> bytes:
    """Read a small object whole, refusing one larger than ``limit`` without reading it all."""
    data = read_prefix(fs, path, url, limit + 1)
    if len(data) > limit:
        raise StoreError(f"{url}: larger than {limit} bytes; not {what}")
    return data


class Store:
    """A store rooted at ``url`` (a local path, ``file://``, ``s3://``, ``memory://``, ...)."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        location = os.fspath(url) if isinstance(url, str | os.PathLike) else None
        if not isinstance(location, str) or not location:
            raise StoreError(f"a store location is a path or URL, got {url!r}")
        url = location
        self.fs, root = open_url(url, storage_options)
        self.root: str = root.rstrip("/") or root
        self.url: str = self.fs.unstrip_protocol(self.root) if not self.is_local else self.root

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def can_list(self) -> bool:
        """Whether folders can be listed (not over HTTP: see :func:`~sepstore.backends.can_list`)."""
        return can_list(self.fs)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- locations -------------------------------------------------------------------------------

    def _path(self, *segments: str) -> str:
        return "/".join((self.root, *segments))

    def url_of(self, path: str) -> str:
        return path if self.is_local else self.fs.unstrip_protocol(path)

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

    def manifest_path(self, name: str, tag: str) -> str:
        return self._path(MANIFESTS_DIR, check_name(name), f"{check_tag(tag)}.json")

    # -- parts and assets ------------------------------------------------------------------------

    def _exists(self, path: str) -> bool:
        """Whether ``path`` exists now: object stores' cached listings may predate other writers."""
        with backend_errors(self.url_of(path)):
            if not self.is_local:
                self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))

    def has_blob(self, blob: Blob) -> bool:
        return self._exists(self.blob_path(blob))

    def blob_size(self, blob: Blob) -> int | None:
        """The size of the file filed under the part's or asset's digest, or ``None`` when there is none."""
        path = self.blob_path(blob)
        with backend_errors(self.url_of(path)):
            if not self.is_local:
                self.fs.invalidate_cache(path)
            try:
                return int(self.fs.size(path))
            except FileNotFoundError:
                return None

    def digest_blob(self, blob: Blob) -> str:
        """The BLAKE3 of the bytes filed under the blob's digest, read (fetched, from a remote store) whole:
        streamed in bounded pieces, cut at the blob's size and under the minimum-progress rule."""
        path = self.blob_path(blob)
        url = self.url_of(path)
        with backend_errors(url):
            if self.is_local:
                return digest_file(path)
            hasher = Hasher()

            def read() -> None:
                hasher.reset()
                stream_range(self.fs, path, url, 0, blob.size, blob.size, lambda _, piece: hasher.update(piece))

            if blob.size:
                with_retries(read, url)
            return digest_of(hasher)

    def _commit(
        self, tmp: str, blob: Blob, *, protect: Callable[[str], None] | None = None, replace: bool = False
    ) -> bool:
        """File the local file ``tmp`` as ``blob`` unless the store has it (or ``replace``);
        whether it was written. ``protect(digest)`` runs first, before the file is looked for: a
        publisher's lease names the digest before it relies on the file (see :mod:`sepstore.leases`)."""
        if protect is not None:
            protect(blob.digest)
        final = self.blob_path(blob)
        if not replace and self._exists(final):
            if self.is_local:  # in use again: restart its gc grace period
                with backend_errors(self.url_of(final)), contextlib.suppress(FileNotFoundError):
                    os.utime(final)
            return False
        with backend_errors(self.url_of(final)):
            if self.is_local:
                replace_durably(tmp, final)
            else:
                self.fs.put_file(tmp, final)
        return True

    def _staging(self) -> str | None:
        """Where temporary files go: the parts folder on local disk (so renames are atomic)."""
        if not self.is_local:
            return None
        staging = self._path(PARTS_DIR)
        with backend_errors(staging):
            make_dirs(staging)
        return staging

    def stage_blob(self, write: Callable[[int], T]) -> tuple[T, str]:
        """Write a part or an asset with ``write(fd)`` into a new temporary file (``fd`` is open for
        reading and writing); the result and the file's path, for :meth:`commit_blob`."""
        fd, tmp = create_temp(self._staging(), ".safetensors")
        try:
            try:
                result = write(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk, a quota: the part being written here
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise StoreError(f"{self.url_of(self.parts_dir)}: cannot write a part or an asset ({exc})") from exc
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return result, tmp

    def commit_blob(self, tmp: str, blob: Blob, *, protect: Callable[[str], None] | None = None) -> bool:
        """File what :meth:`stage_blob` wrote as ``blob`` (unless the store has it; an existing file
        is never rewritten), and delete the temporary file; whether it was new. ``protect`` is
        called with the digest before the store is asked whether it has the file."""
        try:
            return self._commit(tmp, blob, protect=protect)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_blob_file(self, path: str, blob: Blob, *, replace: bool = False) -> bool:
        """Upload a local, already verified part or asset file; whether it was written here. With
        ``replace``, a file already filed under its digest (found damaged) is replaced."""
        if not self.is_local:
            return self._commit(path, blob, replace=replace)
        fd, tmp = create_temp(self._staging(), ".safetensors")
        try:
            with backend_errors(self.url_of(self.parts_dir)), os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, WRITE_PIECE)  # a full disk: a StoreError naming the store
            return self._commit(tmp, blob, replace=replace)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def remove(self, path: str) -> None:
        """Delete a file of this store (a part, a temporary file, a lease); one already gone is fine."""
        with backend_errors(self.url_of(path)), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    # -- leases ----------------------------------------------------------------------------------

    def lease_path(self, lease_id: str) -> str:
        if not LEASE_ID_PATTERN.match(lease_id):
            raise StoreError(f"invalid lease id {lease_id!r}")
        return f"{self.leases_dir}/{lease_id}.json"

    def put_lease(self, lease_id: str, data: bytes) -> None:
        """Write (or replace) a lease object atomically. Not fsynced: a lease matters only while
        the process that wrote it runs."""
        path = self.lease_path(lease_id)
        with backend_errors(self.url_of(path)):
            if not self.is_local:
                self.fs.pipe_file(path, data)
                return
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            fd, tmp = create_temp(folder, ".json")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def read_lease(self, lease_id: str) -> bytes | None:
        """A lease object's bytes, or ``None`` when it is gone (its holder finished)."""
        path = self.lease_path(lease_id)
        try:
            return read_limited(self.fs, path, self.url_of(path))
        except NotFoundError:
            return None

    def list_leases(self) -> list[str]:
        """The ids of every lease object in the store, as the backend lists them now."""
        base = self.leases_dir
        with backend_errors(self.url_of(base)):
            if not self.is_local:
                self.fs.invalidate_cache(base)
            try:
                found = self.fs.ls(base, detail=False)
            except FileNotFoundError:
                return []
        ids = (str(path).rstrip("/").rsplit("/", 1)[-1].removesuffix(".json") for path in found)
        return sorted(i for i in ids if LEASE_ID_PATTERN.match(i))

    def delete_lease(self, lease_id: str) -> None:
        self.remove(self.lease_path(lease_id))

    # -- manifests -------------------------------------------------------------------------------

    def read_manifest_bytes(self, name: str, tag: str) -> bytes:
        path = self.manifest_path(name, tag)
        return read_limited(self.fs, path, self.url_of(path))

    @property
    def _conditional(self) -> bool:
        """Whether the backend replaces an object only if it is unchanged (S3's ``If-Match``)."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return "s3" in protocols

    def _etag(self, path: str) -> str:
        with backend_errors(self.url_of(path)):
            self.fs.invalidate_cache(path)
            return str(self.fs.info(path)["ETag"])

    def read_manifest_version(self, name: str, tag: str) -> tuple[bytes, str | None]:
        """The tag's manifest and a token for this version of it (S3's ETag), to pass as
        ``write_manifest_bytes(..., if_version=)``; ``None`` on backends that cannot replace
        conditionally (on local disk, :meth:`tag_lock` serialises writers instead)."""
        if not self._conditional:
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
        """Write a manifest atomically, replacing the tag's previous one; whether it was written.

        With ``create``, only if the tag holds none yet: atomic on local disk (a hard link) and on
        S3 (a conditional ``If-None-Match`` PUT); other backends check, then write. With
        ``if_version`` (from :meth:`read_manifest_version`), only if the manifest is still that
        version (S3's ``If-Match``)."""
        path = self.manifest_path(name, tag)
        with backend_errors(self.url_of(path)):
            if not self.is_local:
                try:
                    if if_version is not None:
                        self.fs.pipe_file(path, data, IfMatch=if_version)
                    else:
                        self.fs.pipe_file(path, data, mode="create" if create else "overwrite")
                except FileExistsError:
                    return False
                except OSError as exc:
                    if _s3_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                        return False
                    raise
                return True
            with staged(path, data) as tmp:
                if not create:
                    os.replace(tmp, path)
                else:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return False
                fsync_dir(os.path.dirname(path))
                return True

    @contextlib.contextmanager
    def tag_lock(self, name: str, tag: str) -> Iterator[None]:
        """Serialise read-modify-writes of one tag between processes (local stores; a no-op on
        object stores, where S3 writes conditionally instead, see :meth:`read_manifest_version`)."""
        if not self.is_local:
            yield
            return
        path = self.manifest_path(name, tag)
        with backend_errors(self.url_of(path)):
            make_dirs(os.path.dirname(path))
        with file_lock(path + ".lock"):
            yield

    def require(self) -> None:
        """A :class:`NotFoundError` when nothing at all is at the store's location."""
        with backend_errors(self.url):
            if not self.is_local:
                self.fs.invalidate_cache(self.root)
            if not self.fs.exists(self.root):
                raise NotFoundError(f"{self.url}: no store there (no such folder or bucket)")

    def has_manifest(self, name: str, tag: str) -> bool:
        return self._exists(self.manifest_path(name, tag))

    def list_manifests(self) -> list[tuple[str, str]]:
        """Every ``(name, tag)`` in the store, sorted; a :class:`StoreError` over HTTP (see :attr:`can_list`)."""
        return sorted(self.manifest_entries())

    def manifest_entries(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every ``(name, tag)`` in the store, with its manifest's listing entry (size, modification
        time); a :class:`StoreError` over HTTP (see :attr:`can_list`)."""
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
            if dot and ext == "json" and not tag.startswith(".") and _NAME_RE.match(name) and _TAG_RE.match(tag):
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
        if not _KEY_ID_RE.match(key_id):
            raise StoreError(f"invalid key id {key_id!r}: 64 lowercase hex digits")
        return f"{self.signatures_dir(name, tag)}/{key_id}.json"

    def read_signature_bytes(self, name: str, tag: str, key_id: str) -> bytes:
        """A signature (a bundle's JSON); :class:`NotFoundError` if that key has not signed the tag."""
        path = self.signature_path(name, tag, key_id)
        return read_limited(self.fs, path, self.url_of(path))

    def write_signature_bytes(self, name: str, tag: str, key_id: str, data: bytes) -> None:
        """Write a signature atomically and durably, replacing that key's previous one for the tag."""
        path = self.signature_path(name, tag, key_id)
        with backend_errors(self.url_of(path)):
            if not self.is_local:
                self.fs.pipe_file(path, data)
                return
            with staged(path, data) as tmp:
                os.replace(tmp, path)
                fsync_dir(os.path.dirname(path))

    def list_signatures(self, name: str, tag: str) -> list[str]:
        """The ids of the keys that signed a tag, sorted (backends that cannot list, such as HTTP,
        raise :class:`StoreError`)."""
        found = self.list_files(self.signatures_dir(name, tag))
        ids = (str(path).rstrip("/").rsplit("/", 1)[-1].removesuffix(".json") for path in found)
        return sorted(i for i in ids if _KEY_ID_RE.match(i))

    def list_files(self, folder: str, *, recursive: bool = False) -> dict[str, dict[str, Any]]:
        """The files in ``folder`` (and below it, if ``recursive``) as the backend lists them now,
        each with its details; none when there is no such folder. A :class:`StoreError` over HTTP
        (see :attr:`can_list`)."""
        if not self.can_list:
            raise StoreError(f"{self.url_of(folder)}: an HTTP server's folders are not listed (a listing is unbounded)")
        with backend_errors(self.url_of(folder)):
            if not self.is_local:
                self.fs.invalidate_cache(folder)
            try:
                if recursive:
                    return dict(self.fs.find(folder, detail=True))
                return {str(info["name"]): info for info in self.fs.ls(folder, detail=True)}
            except FileNotFoundError:
                return {}
