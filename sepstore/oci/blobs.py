"""A read-only fsspec filesystem over a registry repository's blobs, named as a store's
``parts/blake3/`` files, so that the cache and the part reader fetch a model's parts from a registry
as from any other store: ranged, in parallel, in bounded pieces, verified by BLAKE3 on the way in.

Its URLs are ``sepstore-oci://HOST/REPOSITORY`` (internal: the ``oci://`` reference a user gives
is resolved by :func:`sepstore.oci.resolve_oci` into a manifest and one of these), and its options
the :class:`~sepstore.oci.client.Registry` and the map from part file name to blob digest and size.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping
from typing import Any

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from ..backends import _Body, _content_range
from ..errors import IntegrityError
from .client import Registry, _Answer

__all__ = ["PROTOCOL", "OciBlobFileSystem", "blob_url"]

PROTOCOL = "sepstore-oci"


def blob_url(options: Mapping[str, Any], file_name: str) -> str | None:
    """The registry URL (``https://HOST/v2/REPOSITORY/blobs/sha256:...``) of a part or asset file,
    given this filesystem's options; ``None`` if they do not list it."""
    registry, blobs = options.get("registry"), options.get("blobs")
    if not isinstance(registry, Registry) or not isinstance(blobs, Mapping) or file_name not in blobs:
        return None
    return f"{registry.base}/v2/{options['repository']}/blobs/{blobs[file_name][0]}"


class OciBlobFileSystem(AbstractFileSystem):
    """The blobs of ``repository`` in ``registry``, by their file name in a store (``<blake3 hex>.safetensors``
    for a part, ``<blake3 hex>`` for an asset): ``blobs`` maps each to its ``(sha256 digest, size)``."""

    protocol = PROTOCOL
    cachable = False

    def __init__(
        self,
        *,
        registry: Registry,
        repository: str,
        blobs: Mapping[str, tuple[str, int]],
        subject: tuple[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.registry = registry
        self.repository = repository
        self.blobs = dict(blobs)
        self.subject = subject  # the image these blobs are layers of (its signatures hang from it)

    def _blob(self, path: str) -> tuple[str, int]:
        found = self.blobs.get(posixpath.basename(path))
        if found is None:
            raise FileNotFoundError(f"{PROTOCOL}://{path}: no such blob in the image manifest")
        return found

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return {"name": path, "size": self._blob(path)[1], "type": "file"}

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        base = self._strip_protocol(path).rstrip("/")
        entries = [{"name": f"{base}/{name}", "size": size, "type": "file"} for name, (_, size) in self.blobs.items()]
        return entries if detail else [e["name"] for e in entries]

    def open_range(self, path: str, start: int, end: int) -> _RangeBody:
        """One ranged GET of bytes ``start:end``, streamed (see :func:`sepstore.backends.stream_range`)."""
        digest, size = self._blob(path)
        return _RangeBody(self.registry.open_blob(self.repository, digest, start, end), start, end, digest, size)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> _BlobFile:
        if mode != "rb":
            raise NotImplementedError(f"{PROTOCOL}://{path}: registry blobs are read-only here")
        digest, size = self._blob(path)
        return _BlobFile(self, path, digest, size, block_size)


class _BlobFile(AbstractBufferedFile):
    """One blob, read by ranged GETs of exactly the bytes asked for (no read-ahead)."""

    def __init__(self, fs: OciBlobFileSystem, path: str, digest: str, size: int, block_size: Any) -> None:
        self.digest = digest
        super().__init__(fs, path, mode="rb", block_size=block_size or "default", cache_type="none", size=size)

    def _fetch_range(self, start: int, end: int) -> bytes:
        fs: OciBlobFileSystem = self.fs
        return fs.registry.read_blob(fs.repository, self.digest, start, min(end, self.size), self.size)


class _RangeBody(_Body):
    """A registry's answer to a ranged GET, read piece by piece as it arrives. An answer that is the
    whole blob (a part within one cache chunk, or a registry that ignores ``Range``) is hashed on
    the way and its last piece refused unless the SHA-256 is the blob's (the cache checks BLAKE3)."""

    def __init__(self, answer: _Answer, start: int, end: int, digest: str, size: int) -> None:
        self._answer = answer
        first, self.total = _content_range(answer.header("Content-Range"))
        self.ranged = answer.status == 206
        self.offset = start if first is None else first
        self.length = answer.length()
        whole = not self.ranged or (self.offset == 0 and end == size)
        self._digest, self._size, self._done = digest, size, 0
        self._hasher = hashlib.sha256() if whole else None

    def read(self, size: int) -> bytes:
        piece = self._answer.piece(size)
        if self._hasher is not None:
            self._hasher.update(piece)
            self._done += len(piece)
            got = "sha256:" + self._hasher.hexdigest() if self._done == self._size else self._digest
            if got != self._digest:
                raise IntegrityError(
                    f"{self._answer.url}: the blob's SHA-256 is {got}, the registry names it {self._digest}"
                )
        return piece

    def close(self) -> None:
        self._answer.close()
