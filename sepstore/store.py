"""The layout of a sepweight store on a filesystem, and the file helpers its implementations share
(the store interface and its homes are in :mod:`sepstore.stores`; ``Store`` is re-exported here).

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
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .backends import read_head
from .errors import NotFoundError, SepstoreError, StoreError
from .manifest import MAX_MANIFEST_BYTES, NAME_PATTERN, TAG_PATTERN
from .retry import certificate_refused, http_status, is_transient, with_retries
from .stores.base import Store

__all__ = [
    "BLOB_FILE",
    "KEY_ID_RE",
    "LEASES_DIR",
    "LEASE_ID_PATTERN",
    "MANIFESTS_DIR",
    "NAME_RE",
    "PARTS_DIR",
    "SIGNATURES_DIR",
    "TAG_RE",
    "TEMP_PATTERN",
    "Store",
    "backend_call",
    "backend_errors",
    "check_name",
    "check_tag",
    "create_temp",
    "file_lock",
    "fsync_dir",
    "make_dirs",
    "modified_time",
    "read_limited",
    "read_prefix",
    "replace_durably",
    "s3_code",
    "staged",
    "standard_parts_location",
]

T = TypeVar("T")

PARTS_DIR = "parts/blake3"
MANIFESTS_DIR = "manifests"
LEASES_DIR = "leases"
#: The names of lease objects, ``leases/<id>.json``: who holds it, then a random part.
LEASE_ID_PATTERN = re.compile(r"^(?:publish|gc)-[0-9a-f]{16}\Z")
SIGNATURES_DIR = "signatures"
NAME_RE = re.compile(NAME_PATTERN)
TAG_RE = re.compile(TAG_PATTERN)
KEY_ID_RE = re.compile(r"^[0-9a-f]{64}\Z")

#: The name of a part (``<hex>.safetensors``) or asset (``<hex>``) file in ``parts/blake3/``; group 1 is the hex.
BLOB_FILE = re.compile(r"^([0-9a-f]{64})(?:\.safetensors)?\Z")

#: What :func:`create_temp` names files (``gc`` removes stale ones by this pattern, nothing else).
TEMP_PATTERN = re.compile(r"^\.tmp-[0-9a-f]{16}\.(?:safetensors|json)\Z")


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
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise StoreError(
            f"invalid model name {name!r}: use segments of letters, digits, '.', '_' and '-' joined by '/' "
            "(e.g. 'meta-llama/Llama-3-8B'), never '.' or '..'"
        )
    return name


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag) or tag.startswith("."):
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
        if s3_code(exc) == "NoSuchBucket":
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


def backend_call(fs: fsspec.AbstractFileSystem, url: str, call: Callable[[], T]) -> T:
    """``call()`` (a request to ``fs``), its backend's errors translated (naming ``url``); off local
    disk, a transient failure is tried again (:func:`~sepstore.retry.with_retries`: see
    :mod:`sepstore.backends` for S3's retries)."""
    if isinstance(fs, LocalFileSystem):
        with backend_errors(url):
            return call()

    def attempt() -> T:
        try:
            return call()
        except Exception as exc:
            # fsspec's HTTP reports a failed look-up as "not found", caused by the real failure
            cause = exc.__cause__ if isinstance(exc, FileNotFoundError) else exc
            if cause is not None and (is_transient(cause) or certificate_refused(cause)):
                raise  # with_retries tries again, or says what to do about the certificate
            with backend_errors(url):
                raise

    return with_retries(attempt, url)


def s3_code(exc: BaseException) -> str | None:
    """The S3 error code behind an s3fs exception (s3fs keeps botocore's error as the cause)."""
    response = getattr(exc.__cause__, "response", None)
    error = response.get("Error") if isinstance(response, dict) else None
    code = error.get("Code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def read_prefix(fs: fsspec.AbstractFileSystem, path: str, url: str, limit: int) -> bytes:
    """The first ``limit`` bytes of an object (all of it, if shorter), never holding more; from a
    remote backend, transient failures (dropped connections, 5xx, stalls) are retried."""

    return backend_call(fs, url, lambda: read_head(fs, path, url, limit))


def read_limited(
    fs: fsspec.AbstractFileSystem, path: str, url: str, limit: int = MAX_MANIFEST_BYTES, *, what: str = "a manifest"
) -> bytes:
    """Read a small object whole, refusing one larger than ``limit`` without reading it all."""
    data = read_prefix(fs, path, url, limit + 1)
    if len(data) > limit:
        raise StoreError(f"{url}: larger than {limit} bytes; not {what}")
    return data
