"""A client of the OCI distribution API (blobs, manifests, tags, referrers) with sepstore's transport rules.

Every answer is read in pieces of at most :data:`~sepstore.backends.PIECE_BYTES`, its declared
length checked before anything is allocated and its body cut at the length expected; connecting and
each read are bounded by ``$SEPSTORE_TIMEOUT``, and a transfer slower than ``$SEPSTORE_MIN_SPEED``
is aborted (see :mod:`sepstore.backends`). Uploads stream from the file, hashed (SHA-256) on the way.
Every failure is a :class:`~sepstore.errors.SepstoreError` naming the URL: 404 a
:class:`~sepstore.errors.NotFoundError`, 401/403 a :class:`~sepstore.errors.RegistryAuthError`,
408/429/5xx and dropped connections a :class:`~sepstore.retry.TransientError` (retried by
:func:`~sepstore.retry.with_retries`), anything else a :class:`~sepstore.errors.RegistryError`.

HTTPS is the default. Plain HTTP is used only for a loopback host (``localhost``, ``127.0.0.1``,
``[::1]``) that does not speak TLS, or for a host the caller marks ``insecure`` (or lists in
``$SEPSTORE_OCI_INSECURE``, comma-separated ``host[:port]``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, Final

import urllib3

from .._version import __version__
from ..backends import PIECE_BYTES, RangeBody, _content_range, _Progress, timeout
from ..errors import IntegrityError, NotFoundError, RegistryAuthError, RegistryError, SepstoreError
from ..retry import TransientError, with_retries
from .auth import Credentials, credentials_for, parse_challenge

__all__ = [
    "DOCKER_MANIFEST",
    "MAX_MANIFEST_BYTES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Registry",
    "RegistryTransientError",
    "Upload",
    "is_loopback",
    "sha256_file",
]

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
#: Image manifests larger than this are refused (distribution's own limit is 4 MiB).
MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024
#: Token answers, error bodies and tag-list pages are read up to these sizes.
_MAX_TOKEN_BYTES = 1024 * 1024
_MAX_ERROR_BYTES = 16 * 1024
_MAX_TAGS_PAGE_BYTES = 8 * 1024 * 1024
_REDIRECTS = 5
#: Blobs up to this size are uploaded in one PUT; larger ones in PATCH chunks of this size.
UPLOAD_CHUNK: Final = 64 * 1024 * 1024
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")


class RegistryTransientError(TransientError, RegistryError):
    """A registry request that failed in a way another try may not (5xx, 429, a dropped connection)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (``name[:port]``) is this machine: ``localhost`` or a loopback address."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") and host.count(":") == 1 else host
    name = name.split("]")[0].lstrip("[") if name.startswith("[") else name
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _insecure_hosts() -> set[str]:
    return {h.strip().lower() for h in os.environ.get("SEPSTORE_OCI_INSECURE", "").split(",") if h.strip()}


def sha256_file(path: str, *, also: Callable[[bytes], None] | None = None) -> tuple[str, int]:
    """The ``sha256:<hex>`` digest and size of a local file, read in bounded pieces (each handed to ``also`` too)."""
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as file:
        while piece := file.read(PIECE_BYTES):
            hasher.update(piece)
            if also is not None:
                also(piece)
            size += len(piece)
    return "sha256:" + hasher.hexdigest(), size


@dataclass
class _Answer:
    """An HTTP answer whose body is still unread, read only through the bounded methods below."""

    raw: urllib3.BaseHTTPResponse
    url: str
    _progress: _Progress | None = None

    @property
    def status(self) -> int:
        return self.raw.status

    def header(self, name: str) -> str | None:
        value = self.raw.headers.get(name)
        return value if isinstance(value, str) else None

    def length(self) -> int | None:
        value = self.header("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def piece(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body, as soon as some are in (``b""`` at its end), under the
        minimum-progress rule (see :mod:`sepstore.backends`) counted from this answer's first piece."""
        if self._progress is None:
            self._progress = _Progress()
        try:
            data = self.raw.read1(size)
        except urllib3.exceptions.HTTPError as exc:
            raise RegistryTransientError(f"{type(exc).__name__}: {exc}") from exc
        self._progress.add(len(data))
        if data and self._progress.remaining() <= 0:
            raise RegistryTransientError(str(self._progress.stalled()))
        return data

    def pieces(self, expected: int | None = None) -> Iterator[bytes]:
        """The body in pieces of at most ``PIECE_BYTES``; with ``expected``, exactly that many bytes
        (a longer body is an :class:`IntegrityError`, a shorter one a :class:`RegistryTransientError`)."""
        done = 0
        while expected is None or done < expected:
            piece = self.piece(PIECE_BYTES if expected is None else min(PIECE_BYTES, expected - done))
            if not piece:
                break
            done += len(piece)
            yield piece
        if expected is not None and done < expected:
            raise RegistryTransientError(f"got {done} bytes of {expected}")
        if expected is not None and self.piece(1):
            raise IntegrityError(f"{self.url}: the registry sent more than the {expected} bytes expected")

    def read(self, limit: int, what: str) -> bytes:
        """The whole body, refused (before it is read, where its length is declared) if over ``limit`` bytes."""
        declared = self.length()
        if declared is not None and declared > limit:
            raise RegistryError(f"{self.url}: {what} is {declared} bytes, over the {limit}-byte limit; refused")
        data = bytearray()
        for piece in self.pieces():
            data += piece
            if len(data) > limit:
                raise RegistryError(f"{self.url}: {what} is over the {limit}-byte limit; refused")
        return bytes(data)

    def close(self) -> None:
        """Give the connection back to the pool once the body is read; else drop the connection
        (reading an unread rest could take as long as the server likes)."""
        if self.raw.length_remaining == 0:
            with contextlib.suppress(urllib3.exceptions.HTTPError, OSError):
                self.raw.drain_conn()  # nothing left to read: this ends the exchange on the connection
        else:
            self.raw.close()
        self.raw.release_conn()

    def problem(self) -> str:
        """What the registry said was wrong, from its error body (``{"errors": [{"code", "message"}]}``)."""
        try:
            body = self.read(_MAX_ERROR_BYTES, "the error answer")
        except (RegistryError, IntegrityError):
            return ""
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            errors = json.loads(body)["errors"]
            return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)[:500]
        return body[:200].decode("utf-8", "replace")


class _BlobBody(RangeBody):
    """A registry's answer to a ranged GET of a blob, read piece by piece as it arrives. An answer
    that is the whole blob when a range was asked for (a registry that ignores ``Range``) is hashed
    on the way and its last piece refused unless its SHA-256 is the blob's; a reader of a whole
    blob checks its SHA-256 itself (:meth:`~sepstore.stores.base.Blobs.extra_digests`)."""

    def __init__(self, answer: _Answer, start: int, digest: str, size: int) -> None:
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
    """A blob put into a repository, and how: ``"uploaded"`` (its bytes sent), ``"mounted"`` (from
    another repository of the registry) or ``"present"`` (the repository had it)."""

    digest: str
    size: int
    how: str  # "uploaded", "mounted" or "present"


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


class Registry:
    """One OCI registry (``host[:port]``), its connections and its authentication state, shared by threads.

    ``credentials`` default to :func:`~sepstore.oci.auth.credentials_for`; ``insecure`` allows plain
    HTTP to a host that is not a loopback one (see the module's docstring).
    """

    def __init__(self, host: str, *, credentials: Credentials | None = None, insecure: bool = False) -> None:
        if not isinstance(host, str) or not _HOST.fullmatch(host):
            raise RegistryError(f"{host!r} is not a registry host (host or host:port)")
        self.host = host
        self.insecure = insecure or host.lower() in _insecure_hosts()
        self.credentials = credentials if credentials is not None else credentials_for(host)
        seconds = timeout()
        self._http = urllib3.PoolManager(
            num_pools=4,
            maxsize=32,
            retries=False,
            timeout=urllib3.Timeout(connect=seconds, read=seconds),
            headers={"User-Agent": f"sepstore/{__version__}"},
        )
        self._lock = threading.Lock()
        self._base: str | None = None
        self._basic = False
        self._tokens: dict[str, tuple[str, float]] = {}

    # -- transport ---------------------------------------------------------------------------------

    @property
    def base(self) -> str:
        """``https://host`` (or ``http://host`` for a loopback or insecure host that does not speak TLS)."""
        if self._base is None:
            base = f"https://{self.host}"
            if is_loopback(self.host) or self.insecure:
                try:
                    self._send("GET", f"{base}/v2/", {}, None).close()
                except RegistryTransientError as exc:
                    if not isinstance(exc.__cause__, urllib3.exceptions.SSLError | urllib3.exceptions.ProtocolError):
                        raise RegistryError(f"{base}/v2/: cannot reach the registry ({exc})") from exc
                    base = f"http://{self.host}"
            self._base = base
        return self._base

    def _send(self, method: str, url: str, headers: Mapping[str, str], body: Any) -> _Answer:
        try:
            raw = self._http.request(
                method,
                url,
                headers=dict(headers),
                body=body,
                preload_content=False,
                decode_content=False,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise RegistryTransientError(f"{method}: {type(exc).__name__}: {exc}") from exc
        return _Answer(raw, url)

    def _home(self, url: str) -> bool:
        """Whether ``url`` is on this registry's host (and port, the scheme's default left out)."""
        parts = urllib.parse.urlsplit(url)
        default = {"https": ":443", "http": ":80"}.get(parts.scheme, "")
        return parts.netloc.lower().removesuffix(default) == self.host.lower().removesuffix(default)

    def _allowed(self, url: str) -> bool:
        """Whether a URL may be requested: HTTPS, or HTTP to a loopback or insecure host."""
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc.rsplit("@", 1)[-1]
        return parts.scheme == "https" or (
            parts.scheme == "http" and (is_loopback(host) or (host == self.host and self.insecure))
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | Callable[[], Any] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> _Answer:
        """Send ``method`` to ``path`` (``/v2/...``, or an absolute URL the registry gave), authenticated
        for ``scope`` (``repository:<name>:pull``), following redirects of reads; the answer if its
        status is in ``ok``. ``body`` is bytes, or a function returning a fresh body (a file region)
        for each try. The caller closes the answer."""
        url = path if "://" in path else self.base + path
        if not self._allowed(url):
            raise RegistryError(f"{url}: plain HTTP to a registry that is not on this machine; use HTTPS or insecure")
        home = self._home(url)  # an upload location elsewhere gets no credentials of this registry
        for attempt in (1, 2):
            sent_auth = self._authorization(scope) if home else {}
            answer = self._send(method, url, {**(headers or {}), **sent_auth}, body() if callable(body) else body)
            answer = self._follow(method, answer, {**(headers or {}), **sent_auth})
            if answer.status != 401:
                break
            challenge = answer.header("WWW-Authenticate")
            answer.close()
            if attempt == 2:
                raise self._refused(url, sent_auth)
            self._authenticate(challenge, scope, url, sent_auth)
        return self._checked(method, answer, ok)

    def _follow(self, method: str, answer: _Answer, headers: Mapping[str, str]) -> _Answer:
        """Follow redirects of a GET or HEAD (blob storage behind the registry); credentials are
        not sent to another host, and a redirect from HTTPS to plain HTTP is refused."""
        for _ in range(_REDIRECTS):
            if method not in ("GET", "HEAD") or answer.status not in (301, 302, 303, 307, 308):
                return answer
            target = urllib.parse.urljoin(answer.url, answer.header("Location") or "")
            answer.close()
            if not self._allowed(target):
                raise RegistryError(f"{answer.url}: redirected to {target}, which is not HTTPS; refused")
            home = self._home(target)  # the registry's own token goes to the registry only
            sent = {k: v for k, v in headers.items() if k.lower() != "authorization" or home}
            answer = self._send(method, target, sent, None)
        raise RegistryError(f"{answer.url}: more than {_REDIRECTS} redirects")

    def _checked(self, method: str, answer: _Answer, ok: tuple[int, ...]) -> _Answer:
        if answer.status in ok:
            return answer
        said = answer.problem() if method != "HEAD" else ""
        answer.close()
        url, status = answer.url, answer.status
        detail = f" ({said})" if said else ""
        if status == 404:
            raise NotFoundError(f"{url}: not found{detail}")
        if status == 403:
            raise RegistryAuthError(f"{url}: the registry denies this{detail}; check the account's permissions")
        if status in (408, 429) or status >= 500:
            raise RegistryTransientError(f"{method}: HTTP {status}{detail}")  # with_retries names the URL
        raise RegistryError(f"{method} {url}: HTTP {status}{detail}")

    # -- authentication -----------------------------------------------------------------------------

    def _authorization(self, scope: str) -> dict[str, str]:
        with self._lock:
            token = self._tokens.get(scope)
            if token is not None and token[1] > time.monotonic():
                return {"Authorization": f"Bearer {token[0]}"}
            if self._basic and self.credentials is not None:
                return {"Authorization": self.credentials.basic()}
        return {}

    def _refused(self, url: str, sent: Mapping[str, str]) -> RegistryAuthError:
        if self.credentials is None:
            return RegistryAuthError(
                f"{url}: the registry wants credentials; log in with `docker login {self.host}`, or set "
                "$SEPSTORE_OCI_USERNAME and $SEPSTORE_OCI_PASSWORD"
            )
        return RegistryAuthError(
            f"{url}: the registry refused the credentials of user {self.credentials.username!r} "
            f"(from {self.credentials.source}); check them"
        )

    def _authenticate(self, header: str | None, scope: str, url: str, sent: Mapping[str, str]) -> None:
        """Answer a 401's challenge: basic auth with the credentials, or a bearer token for ``scope``."""
        challenge = parse_challenge(header)
        if challenge is None:
            raise RegistryError(f"{url}: HTTP 401 without a WWW-Authenticate challenge")
        if challenge.scheme == "basic":
            if self.credentials is None or sent:
                raise self._refused(url, sent)
            with self._lock:
                self._basic = True
            return
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise RegistryError(f"{url}: unsupported authentication challenge {header!r}")
        realm = challenge.params["realm"]
        if not self._allowed(realm):
            raise RegistryAuthError(f"{url}: the token service {realm} is not HTTPS; refused")
        scopes = sorted({scope, *challenge.params.get("scope", "").split()} - {""})
        query = [("service", challenge.params["service"])] if "service" in challenge.params else []
        query += [("scope", s) for s in scopes]
        token_url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        auth = {"Authorization": self.credentials.basic()} if self.credentials is not None else {}
        answer = self._send("GET", token_url, auth, None)
        try:
            if answer.status == 401 or answer.status == 403:
                raise self._refused(url, auth)
            if answer.status != 200:
                raise RegistryAuthError(f"{token_url}: the token service answered HTTP {answer.status}")
            body = answer.read(_MAX_TOKEN_BYTES, "the token answer")
        finally:
            answer.close()
        try:
            answer_json = json.loads(body)
            token = answer_json.get("token") or answer_json.get("access_token")
            lifetime = answer_json.get("expires_in", 60)
        except (ValueError, AttributeError):
            token, lifetime = None, 0
        if not isinstance(token, str) or not token:
            raise RegistryAuthError(f"{token_url}: the token service's answer holds no token")
        seconds = lifetime if isinstance(lifetime, int | float) and lifetime > 0 else 60
        with self._lock:
            self._tokens[scope] = (token, time.monotonic() + max(seconds - 5, 1))

    # -- blobs -------------------------------------------------------------------------------------

    @staticmethod
    def scope(repository: str, *actions: str) -> str:
        return f"repository:{repository}:{','.join(actions or ('pull',))}"

    def blob_size(self, repository: str, digest: str) -> int | None:
        """The size of blob ``digest`` in ``repository``, or ``None`` if it is not there."""
        path = f"/v2/{repository}/blobs/{_checked_digest(digest)}"

        def head() -> int | None:
            try:
                answer = self.request("HEAD", path, scope=self.scope(repository))
            except NotFoundError:
                return None
            answer.close()
            return answer.length()

        return with_retries(head, self.base + path)

    def read_blob(self, repository: str, digest: str, start: int, end: int, size: int) -> bytes:
        """Bytes ``start:end`` of the ``size``-byte blob ``digest`` (a ranged GET; a registry that
        ignores ``Range`` is read up to ``end`` and the rest dropped)."""
        path = f"/v2/{repository}/blobs/{_checked_digest(digest)}"
        if not 0 <= start <= end <= size:
            raise RegistryError(f"{self.base}{path}: bytes {start}-{end} asked of a {size}-byte blob")

        def get() -> bytes:
            answer = self.request(
                "GET",
                path,
                scope=self.scope(repository),
                headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"},
                ok=(200, 206),
            )
            try:
                return _ranged_body(answer, start, end, size)
            finally:
                answer.close()

        return b"" if start == end else with_retries(get, self.base + path)

    def open_blob(self, repository: str, digest: str, start: int, end: int, size: int) -> RangeBody:
        """A GET of bytes ``start:end`` of the ``size``-byte blob ``digest`` with its body unread (206,
        or 200 from a registry that ignores ``Range``): for :func:`~sepstore.backends.stream_body`,
        which checks the answer's span and length and reads it piece by piece. The caller closes it."""
        path = f"/v2/{repository}/blobs/{_checked_digest(digest)}"
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
        path = f"/v2/{repository}/blobs/{_checked_digest(digest)}"
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
        mount_from: str | None = None,
        chunk: int = UPLOAD_CHUNK,
    ) -> Upload:
        """Put the local file ``path`` (or these bytes; of SHA-256 ``digest``, ``size`` bytes) into ``repository``:
        mounted from ``mount_from`` (another repository of this registry) where it allows, else
        streamed from the file, in one PUT or in PATCH chunks of ``chunk`` bytes, its SHA-256
        computed on the way and checked against ``digest`` before the upload is closed."""
        digest = _checked_digest(digest)
        scope = self.scope(repository, "pull", "push")
        start = f"/v2/{repository}/blobs/uploads/"
        url = self.base + start

        def attempt() -> Upload:
            query = urllib.parse.urlencode({"mount": digest, "from": mount_from}) if mount_from else ""
            answer = self.request("POST", start + (f"?{query}" if query else ""), scope=scope, body=b"", ok=(201, 202))
            answer.close()
            if answer.status == 201:
                return Upload(digest, size, "mounted")
            location = self._location(answer, url)
            hasher = hashlib.sha256()
            with open(path, "rb") if isinstance(path, str) else io.BytesIO(path) as file:
                if size <= chunk:
                    put = _with_query(location, {"digest": digest})
                    hasher = self._put_region(put, scope, file, 0, size, hasher, "PUT", (201,))[1]
                else:
                    for at in range(0, size, chunk):
                        length = min(chunk, size - at)
                        patched, hasher = self._put_region(location, scope, file, at, length, hasher, "PATCH", (202,))
                        location = self._location(patched, location)
                    if "sha256:" + hasher.hexdigest() != digest:  # found before the upload is closed: cancel it
                        with contextlib.suppress(SepstoreError):
                            self.request("DELETE", location, scope=scope, ok=(204,)).close()
                    _same_bytes(path, "sha256:" + hasher.hexdigest(), digest)
                    self.request(
                        "PUT", _with_query(location, {"digest": digest}), scope=scope, body=b"", ok=(201,)
                    ).close()
            _same_bytes(path, "sha256:" + hasher.hexdigest(), digest)
            return Upload(digest, size, "uploaded")

        return with_retries(attempt, url)

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
    ) -> tuple[_Answer, Any]:
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
    def _location(answer: _Answer, url: str) -> str:
        location = answer.header("Location")
        if not location:
            raise RegistryError(f"{url}: the registry started an upload without a Location")
        return urllib.parse.urljoin(answer.url, location)

    def delete_blob(self, repository: str, digest: str) -> None:
        path = f"/v2/{repository}/blobs/{_checked_digest(digest)}"
        scope = self.scope(repository, "pull", "push", "delete")
        with_retries(lambda: self.request("DELETE", path, scope=scope, ok=(202,)).close(), self.base + path)

    # -- manifests, tags, referrers -------------------------------------------------------------------

    def get_manifest(
        self, repository: str, reference: str, *, accept: tuple[str, ...] = (OCI_MANIFEST,)
    ) -> tuple[bytes, str, str]:
        """The manifest ``reference`` (a tag or ``sha256:`` digest) names: its bytes, media type and
        digest (checked against the bytes when ``reference`` is a digest)."""
        path = f"/v2/{repository}/manifests/{reference}"
        url = self.base + path

        def get() -> tuple[bytes, str, str]:
            answer = self.request("GET", path, scope=self.scope(repository), headers={"Accept": ", ".join(accept)})
            try:
                data = answer.read(MAX_MANIFEST_BYTES, "the manifest")
            finally:
                answer.close()
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            if reference.startswith("sha256:") and digest != reference:
                raise IntegrityError(f"{url}: the manifest's SHA-256 is {digest}, not the {reference} asked for")
            media = (answer.header("Content-Type") or "").split(";")[0].strip()
            return data, media, digest

        return with_retries(get, url)

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> tuple[str, bool]:
        """Put a manifest under ``reference`` (a tag, or its own digest); its digest, and whether the
        registry said it indexed its ``subject`` (the referrers API: the ``OCI-Subject`` header)."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise RegistryError(f"a manifest of {len(data)} bytes is over the {MAX_MANIFEST_BYTES}-byte limit")
        path = f"/v2/{repository}/manifests/{reference}"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()

        def put() -> tuple[str, bool]:
            answer = self.request(
                "PUT",
                path,
                scope=self.scope(repository, "pull", "push"),
                headers={"Content-Type": media_type},
                body=data,
                ok=(201,),
            )
            answer.close()
            said = answer.header("Docker-Content-Digest")
            if said is not None and said != digest:
                raise IntegrityError(f"{self.base}{path}: the registry stored the manifest as {said}, not {digest}")
            return digest, answer.header("OCI-Subject") is not None

        return with_retries(put, self.base + path)

    def delete_manifest(self, repository: str, digest: str) -> None:
        path = f"/v2/{repository}/manifests/{_checked_digest(digest)}"
        scope = self.scope(repository, "pull", "push", "delete")
        with_retries(lambda: self.request("DELETE", path, scope=scope, ok=(202,)).close(), self.base + path)

    def tags(self, repository: str) -> list[str]:
        """Every tag of ``repository``, page by page as the registry's ``Link`` headers lead."""
        found: list[str] = []
        path: str | None = f"/v2/{repository}/tags/list?n=1000"
        pages = 0
        while path is not None:
            pages += 1
            if pages > 10_000:
                raise RegistryError(f"{self.base}/v2/{repository}/tags/list: more than 10000 pages of tags")
            page, path = self._tags_page(repository, path)
            found += page
        return found

    def _tags_page(self, repository: str, path: str) -> tuple[list[str], str | None]:
        def get() -> tuple[list[str], str | None]:
            answer = self.request("GET", path, scope=self.scope(repository))
            try:
                data = answer.read(_MAX_TAGS_PAGE_BYTES, "the tag list")
            finally:
                answer.close()
            try:
                tags = json.loads(data).get("tags") or []
            except (ValueError, AttributeError):
                raise RegistryError(f"{answer.url}: the tag list is not JSON") from None
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise RegistryError(f"{answer.url}: the tag list's `tags` is not a list of strings")
            link = answer.header("Link")
            match = re.match(r'\s*<([^>]+)>\s*;\s*rel="?next"?', link or "")
            following = urllib.parse.urljoin(answer.url, match.group(1)) if match else None
            elsewhere = following is not None and _netloc(following) != _netloc(answer.url)
            if elsewhere:
                raise RegistryError(f"{answer.url}: the tag list's next page is on another host ({following})")
            return tags, following

        return with_retries(get, path if "://" in path else self.base + path)

    def referrers(self, repository: str, digest: str, artifact_type: str | None = None) -> list[dict[str, Any]] | None:
        """The descriptors of manifests whose ``subject`` is ``digest`` (the referrers API), or
        ``None`` when the registry lacks that API (the caller falls back to the tag schema)."""
        query = f"?{urllib.parse.urlencode({'artifactType': artifact_type})}" if artifact_type else ""
        path = f"/v2/{repository}/referrers/{_checked_digest(digest)}{query}"

        def get() -> list[dict[str, Any]] | None:
            try:
                answer = self.request("GET", path, scope=self.scope(repository))
            except NotFoundError:
                return None
            try:
                if (answer.header("Content-Type") or "").split(";")[0].strip() != OCI_INDEX:
                    return None
                data = answer.read(MAX_MANIFEST_BYTES, "the referrers index")
            finally:
                answer.close()
            return _descriptors(data, self.base + path)

        return with_retries(get, self.base + path)


def _descriptors(data: bytes, url: str) -> list[dict[str, Any]]:
    """The ``manifests`` of an image index, each a mapping."""
    try:
        manifests = json.loads(data).get("manifests") or []
    except (ValueError, AttributeError):
        raise RegistryError(f"{url}: the image index is not JSON") from None
    if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        raise RegistryError(f"{url}: the image index's `manifests` is not a list of descriptors")
    return manifests


def _same_bytes(path: str | bytes, got: str, digest: str) -> None:
    if got != digest:
        what = path if isinstance(path, str) else "the data"
        raise IntegrityError(f"{what}: SHA-256 of the bytes sent is {got}, not {digest} (changed while uploaded?)")


def _netloc(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def _checked_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise RegistryError(f"{digest!r} is not a blob digest (sha256:<64 lowercase hex>)")
    return digest


def _with_query(url: str, params: Mapping[str, str]) -> str:
    return url + ("&" if "?" in url else "?") + urllib.parse.urlencode(params)


def _ranged_body(answer: _Answer, start: int, end: int, size: int) -> bytes:
    """The bytes ``start:end`` from an answer to a ranged GET: a 206 must be for exactly that range;
    a 200 (the registry ignored ``Range``) is the whole blob, read up to ``end``."""
    url = answer.url
    if answer.status == 206:
        span = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", answer.header("Content-Range") or "")
        if span is None or (int(span.group(1)), int(span.group(2)) + 1) != (start, end):
            raise IntegrityError(f"{url}: asked for bytes {start}-{end - 1}, got {answer.header('Content-Range')!r}")
        if span.group(3) != "*" and int(span.group(3)) != size:
            raise IntegrityError(f"{url}: the blob is {span.group(3)} bytes, the manifest says {size}")
        return b"".join(answer.pieces(end - start))
    declared = answer.length()
    if declared is not None and declared != size:
        raise IntegrityError(f"{url}: the blob is {declared} bytes, the manifest says {size}")
    kept = bytearray()
    at = 0
    for piece in answer.pieces(end):
        kept += piece[max(start - at, 0) :]
        at += len(piece)
    return bytes(kept)
