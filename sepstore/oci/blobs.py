"""Blob calls of the OCI registry client (:mod:`sepstore.oci.client`): sizes, ranged and whole
reads, uploads (streamed from the file, hashed with SHA-256 on the way; in one pass where the
digest is not known yet), cross-repository mounts and deletion."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any, Final

from ..backends import PIECE_BYTES, RangeBody, _content_range
from ..errors import IntegrityError, NotFoundError, RegistryError, SepstoreError, StoreError
from ..retry import with_retries
from .transport import Answer, Transport

__all__ = ["UPLOAD_CHUNK", "BlobCalls", "Upload", "checked_digest"]

#: Blobs up to this size are uploaded in one PUT; larger ones in PATCH chunks of this size.
UPLOAD_CHUNK: Final = 64 * 1024 * 1024
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}\Z")


class _BlobBody(RangeBody):
    """A registry's answer to a ranged GET of a blob, read piece by piece as it arrives. An answer
    that is the whole blob when a range was asked for (a registry that ignores ``Range``) is hashed
    on the way and its last piece refused unless its SHA-256 is the blob's; a reader of a whole
    blob checks its SHA-256 itself (:meth:`~sepstore.stores.base.Blobs.extra_digests`)."""

    def __init__(self, answer: Answer, start: int, digest: str, size: int) -> None:
        self._answer = answer
        first, self.total = _content_range(answer.header("Content-Range"))
        self.ranged = answer.status == 206
        self.offset = start if first is None else first
        self.length = answer.length()
        self._digest, self._size, self._done = digest, size, 0
        self._hasher = None if self.ranged else hashlib.sha256()

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


@dataclass(frozen=True)
class Upload:
    """A blob uploaded into a repository."""

    digest: str
    size: int


class _Region:
    """``length`` bytes of a file from ``start``, read by urllib3 as a request body and hashed on the way."""

    def __init__(self, file: IO[bytes], start: int, length: int, hasher: Any) -> None:
        self._file, self._length, self.hasher = file, length, hasher
        self._name = getattr(file, "name", "the data")
        self._done = 0
        file.seek(start)

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._done
        want = left if size is None or size < 0 else min(size, left)
        data = self._file.read(min(want, PIECE_BYTES))
        if want and not data:  # a body shorter than its Content-Length would leave the registry waiting
            raise IntegrityError(f"{self._name}: ended after {self._done} of the {self._length} bytes to send")
        self.hasher.update(data)
        self._done += len(data)
        return data


class BlobCalls(Transport):
    """The blob calls of a registry client."""

    def blob_size(self, repository: str, digest: str) -> int | None:
        """The size of blob ``digest`` in ``repository``, or ``None`` if it is not there."""
        path = f"/v2/{repository}/blobs/{checked_digest(digest)}"

        def head() -> int | None:
            try:
                answer = self.request("HEAD", path, scope=self.scope(repository))
            except NotFoundError:
                return None
            answer.close()
            return answer.length()

        return with_retries(head, self.base + path)

    def open_blob(self, repository: str, digest: str, start: int, end: int, size: int) -> RangeBody:
        """A GET of bytes ``start:end`` of the ``size``-byte blob ``digest`` with its body unread (206,
        or 200 from a registry that ignores ``Range``): for :func:`~sepstore.backends.stream_body`,
        which checks the answer's span and length and reads it piece by piece. The caller closes it."""
        path = f"/v2/{repository}/blobs/{checked_digest(digest)}"
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        answer = with_retries(
            lambda: self.request("GET", path, scope=self.scope(repository), headers=headers, ok=(200, 206)),
            self.base + path,
        )
        return _BlobBody(answer, start, digest, size)

    def download_blob(
        self, repository: str, digest: str, size: int, write: Callable[[bytes], None], *, what: str = "blob"
    ) -> None:
        """Stream the whole blob ``digest`` into ``write`` piece by piece, checking its size and
        SHA-256: an :class:`IntegrityError` once the last piece is in if they differ (the caller
        discards what it wrote)."""
        path = f"/v2/{repository}/blobs/{checked_digest(digest)}"
        url = self.base + path

        def get() -> None:
            answer = self.request("GET", path, scope=self.scope(repository), headers={"Accept-Encoding": "identity"})
            try:
                declared = answer.length()
                if declared is not None and declared != size:
                    raise IntegrityError(f"{url}: {what} is {declared} bytes, the manifest says {size}")
                hasher = hashlib.sha256()
                for piece in answer.pieces(size):
                    hasher.update(piece)
                    write(piece)
            finally:
                answer.close()
            got = "sha256:" + hasher.hexdigest()
            if got != digest:
                raise IntegrityError(f"{url}: {what}'s SHA-256 is {got}, the registry names it {digest}")

        with_retries(get, url, attempts=1)

    def upload_blob(
        self,
        repository: str,
        path: str | bytes,
        digest: str,
        size: int,
        *,
        chunk: int = UPLOAD_CHUNK,
    ) -> Upload:
        """Put the local file ``path`` (or these bytes; of SHA-256 ``digest``, ``size`` bytes) into
        ``repository``: streamed from the file, in one PUT or in PATCH chunks of ``chunk`` bytes, its
        SHA-256 computed on the way and checked against ``digest`` before the upload is closed."""
        digest = checked_digest(digest)
        scope = self.scope(repository, "pull", "push")
        start = f"/v2/{repository}/blobs/uploads/"
        url = self.base + start

        def attempt() -> Upload:
            location = self._open_upload(start, scope, url)
            hasher: Any = hashlib.sha256()
            with open(path, "rb") if isinstance(path, str) else io.BytesIO(path) as file:
                if size <= chunk:
                    put = _with_query(location, {"digest": digest})
                    hasher = self._put_region(put, scope, file, 0, size, hasher, "PUT", (201,))[1]
                else:
                    location, hasher = self._patch_chunks(location, scope, file, size, chunk, hasher)
                    if "sha256:" + hasher.hexdigest() != digest:  # found before the upload is closed: cancel it
                        self._cancel_upload(location, scope)
                    _same_bytes(path, "sha256:" + hasher.hexdigest(), digest)
                    self.request(
                        "PUT", _with_query(location, {"digest": digest}), scope=scope, body=b"", ok=(201,)
                    ).close()
            _same_bytes(path, "sha256:" + hasher.hexdigest(), digest)
            return Upload(digest, size)

        return with_retries(attempt, url)

    def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Mount blob ``digest`` of ``from_repository`` into ``repository`` (the same registry's copy,
        no bytes sent); ``False`` where the registry does not (it may open an upload instead, which is
        cancelled), refuses it, or fails at it: a mount only saves an upload."""
        digest = checked_digest(digest)
        scope = self.scope(repository, "pull", "push")
        query = urllib.parse.urlencode({"mount": digest, "from": from_repository})
        start = f"/v2/{repository}/blobs/uploads/?{query}"

        def attempt() -> bool:
            answer = self.request("POST", start, scope=scope, body=b"", ok=(201, 202))
            answer.close()
            if answer.status == 201:
                return True
            self._cancel_upload(self._location(answer, self.base + start), scope)  # opened instead: not wanted
            return False

        try:
            return with_retries(attempt, self.base + start)
        except (StoreError, NotFoundError):
            return False

    def upload_new_blob(
        self,
        repository: str,
        path: str,
        size: int,
        *,
        also: Callable[[], Any] | None = None,
        check: Callable[[Any], None] | None = None,
        chunk: int = UPLOAD_CHUNK,
    ) -> str:
        """Upload the local file ``path`` (``size`` bytes) whose SHA-256 is not known yet, in one
        pass: sent in PATCH chunks of ``chunk`` bytes, hashed on the way, and closed under the digest
        computed; its ``sha256:`` digest. ``also()`` makes a second hash (``update``, ``copy``) fed
        the same bytes, handed to ``check`` before the upload is closed: an exception from it
        cancels the upload."""
        scope = self.scope(repository, "pull", "push")
        start = f"/v2/{repository}/blobs/uploads/"
        url = self.base + start

        def attempt() -> str:
            location = self._open_upload(start, scope, url)
            hasher: Any = _Hashing(hashlib.sha256(), also() if also is not None else None)
            with open(path, "rb") as file:
                location, hasher = self._patch_chunks(location, scope, file, size, chunk, hasher)
                if file.read(1):
                    raise IntegrityError(f"{path}: longer than the {size} bytes to send (changed while uploaded?)")
            digest = "sha256:" + hasher.hexdigest()
            try:
                if check is not None:
                    check(hasher.second)
            except BaseException:
                self._cancel_upload(location, scope)
                raise
            self.request("PUT", _with_query(location, {"digest": digest}), scope=scope, body=b"", ok=(201,)).close()
            return digest

        return with_retries(attempt, url)

    def _open_upload(self, start: str, scope: str, url: str) -> str:
        """Start an upload (``POST`` to ``start``); where to send its bytes."""
        answer = self.request("POST", start, scope=scope, body=b"", ok=(202,))
        answer.close()
        return self._location(answer, url)

    def _patch_chunks(
        self, location: str, scope: str, file: IO[bytes], size: int, chunk: int, hasher: Any
    ) -> tuple[str, Any]:
        """Send the ``size`` bytes of ``file`` to an open upload in PATCH requests of ``chunk`` bytes;
        where the upload goes on, and ``hasher`` advanced over them."""
        for at in range(0, size, chunk):
            length = min(chunk, size - at)
            patched, hasher = self._put_region(location, scope, file, at, length, hasher, "PATCH", (202,))
            location = self._location(patched, location)
        return location, hasher

    def _cancel_upload(self, location: str, scope: str) -> None:
        """Cancel an open upload, as far as the registry lets (a failure leaves it to expire)."""
        with contextlib.suppress(SepstoreError):
            self.request("DELETE", location, scope=scope, ok=(204,)).close()

    def _put_region(
        self,
        url: str,
        scope: str,
        file: IO[bytes],
        start: int,
        length: int,
        hasher: Any,
        method: str,
        ok: tuple[int, ...],
    ) -> tuple[Answer, Any]:
        """Send bytes ``start:start+length`` of ``file`` as the body of ``method`` to ``url``; the
        answer, and ``hasher`` (a SHA-256 of the bytes before) advanced over the bytes sent."""
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        if method == "PATCH":
            headers["Content-Range"] = f"{start}-{start + length - 1}"
        tries: list[_Region] = []

        def body() -> _Region:
            tries.append(_Region(file, start, length, hasher.copy()))  # each try (after a 401) hashes afresh
            return tries[-1]

        answer = self.request(method, url, scope=scope, headers=headers, body=body, ok=ok)
        answer.close()
        return answer, tries[-1].hasher

    @staticmethod
    def _location(answer: Answer, url: str) -> str:
        location = answer.header("Location")
        if not location:
            raise RegistryError(f"{url}: the registry started an upload without a Location")
        return urllib.parse.urljoin(answer.url, location)

    def delete_blob(self, repository: str, digest: str) -> None:
        path = f"/v2/{repository}/blobs/{checked_digest(digest)}"
        scope = self.scope(repository, "pull", "push", "delete")
        with_retries(lambda: self.request("DELETE", path, scope=scope, ok=(202,)).close(), self.base + path)


class _Hashing:
    """A SHA-256 and an optional second hash fed the same bytes, copied together (a retried request
    body hashes afresh from a copy)."""

    def __init__(self, sha256: Any, second: Any) -> None:
        self.sha256, self.second = sha256, second

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.second is not None:
            self.second.update(data)

    def copy(self) -> _Hashing:
        return _Hashing(self.sha256.copy(), self.second.copy() if self.second is not None else None)

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


def _same_bytes(path: str | bytes, got: str, digest: str) -> None:
    if got != digest:
        what = path if isinstance(path, str) else "the data"
        raise IntegrityError(f"{what}: SHA-256 of the bytes sent is {got}, not {digest} (changed while uploaded?)")


def checked_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise RegistryError(f"{digest!r} is not a blob digest (sha256:<64 lowercase hex>)")
    return digest


def _with_query(url: str, params: Mapping[str, str]) -> str:
    return url + ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
