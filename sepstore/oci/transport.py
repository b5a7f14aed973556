"""The transport of the OCI registry client (:mod:`sepstore.oci.client`): connections, redirects,
authentication (basic, and the registry token flow) and bounded answers.

Every answer is read in pieces of at most :data:`~sepstore.backends.PIECE_BYTES`, its declared
length checked before anything is allocated and its body cut at the length expected; connecting and
each read are bounded by ``$SEPSTORE_TIMEOUT``, and a transfer slower than ``$SEPSTORE_MIN_SPEED``
is aborted (see :mod:`sepstore.backends`). Every failure is a :class:`~sepstore.errors.SepstoreError`
naming the URL: 404 a :class:`~sepstore.errors.NotFoundError`, 401/403 a
:class:`~sepstore.errors.RegistryAuthError`, 408/429/5xx and dropped connections a
:class:`~sepstore.retry.TransientError` (retried by :func:`~sepstore.retry.with_retries`), anything
else a :class:`~sepstore.errors.RegistryError`.

HTTPS is the default. Plain HTTP is used only for a loopback host (``localhost``, ``127.0.0.1``,
``[::1]``) that does not speak TLS, or for a host the caller marks ``insecure`` (or lists in
``$SEPSTORE_OCI_INSECURE``, comma-separated ``host[:port]``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3

from .._version import __version__
from ..backends import PIECE_BYTES, _Progress, timeout
from ..errors import IntegrityError, NotFoundError, RegistryAuthError, RegistryError
from ..retry import TransientError, certificate_refused
from .auth import Credentials, credentials_for, parse_challenge

__all__ = ["Answer", "RegistryTransientError", "Transport", "is_loopback"]

#: Token answers and error bodies are read up to these sizes.
_MAX_TOKEN_BYTES = 1024 * 1024
_MAX_ERROR_BYTES = 16 * 1024
_REDIRECTS = 5
#: A bearer token goes into a header: printable ASCII without spaces, of a bounded length.
_MAX_TOKEN_CHARS = 16 * 1024
_TOKEN = re.compile(rf"[\x21-\x7e]{{1,{_MAX_TOKEN_CHARS}}}")
#: What OpenSSL says when the server answers a TLS hello in plain HTTP: no other try will do better.
_PLAIN_HTTP = re.compile(r"WRONG_VERSION_NUMBER|RECORD_LAYER_FAILURE|HTTP_REQUEST|wrong version number", re.IGNORECASE)
#: A registry API path: ``/v2/<repository>/<kind>/<reference>``.
_API_PATH = re.compile(r"/v2/(?P<repository>.+)/(?P<kind>manifests|blobs|tags)/(?P<reference>[^/]+)")
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


@dataclass
class Answer:
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


class Transport:
    """The connections to one OCI registry (``host[:port]``) and its authentication state, shared by
    threads: :meth:`request` sends a request, authenticated for a repository scope.

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
                except RegistryError as exc:
                    if not isinstance(exc.__cause__, urllib3.exceptions.SSLError | urllib3.exceptions.ProtocolError):
                        raise RegistryError(f"{base}/v2/: cannot reach the registry ({exc})") from exc
                    base = f"http://{self.host}"
            self._base = base
        return self._base

    def _send(self, method: str, url: str, headers: Mapping[str, str], body: Any) -> Answer:
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
        except urllib3.exceptions.SSLError as exc:
            if certificate_refused(exc):
                raise RegistryError(
                    f"{method} {url}: the registry's TLS certificate did not verify ({exc}); if it is signed by "
                    "a CA of your own, name its certificate in $SSL_CERT_FILE (or a folder of them in "
                    "$SSL_CERT_DIR); --insecure is only for a registry that speaks plain HTTP"
                ) from exc
            if not _PLAIN_HTTP.search(str(exc)):
                raise RegistryTransientError(f"{method}: {type(exc).__name__}: {exc}") from exc
            raise RegistryError(
                f"{method} {url}: the TLS handshake failed ({exc}); does the registry speak plain HTTP? Pass "
                f"--insecure (storage option insecure=True), or set $SEPSTORE_OCI_INSECURE={self.host}"
            ) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise RegistryTransientError(f"{method}: {type(exc).__name__}: {exc}") from exc
        return Answer(raw, url)

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
    ) -> Answer:
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
            if not self._home(answer.url):  # blob storage, or an upload location, on another host
                raise RegistryAuthError(
                    f"{answer.url}: blob storage there asks for authentication; sepstore sends the "
                    f"registry's credentials only to {self.host}"
                )
            if attempt == 2:
                raise self._refused(url, sent_auth)
            self._authenticate(challenge, scope, url, sent_auth)
        return self._checked(method, answer, ok)

    def _follow(self, method: str, answer: Answer, headers: Mapping[str, str]) -> Answer:
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

    def _checked(self, method: str, answer: Answer, ok: tuple[int, ...]) -> Answer:
        if answer.status in ok:
            return answer
        said = answer.problem() if method != "HEAD" else ""
        answer.close()
        url, status = answer.url, answer.status
        detail = f" ({said})" if said else ""
        if status == 404:
            raise self._not_found(url, said, detail)
        if status == 403:
            raise RegistryAuthError(f"{url}: the registry denies this{detail}; check the account's permissions")
        if status in (408, 429) or status >= 500:
            raise RegistryTransientError(f"{method}: HTTP {status}{detail}")  # with_retries names the URL
        raise RegistryError(f"{method} {url}: HTTP {status}{detail}")

    def _not_found(self, url: str, said: str, detail: str) -> NotFoundError:
        """A 404, saying which of the repository or its tag (or image) the registry does not know."""
        match = _API_PATH.fullmatch(urllib.parse.urlsplit(url).path) if self._home(url) else None
        if match is None:
            return NotFoundError(f"{url}: not found{detail}")
        repository, reference = match["repository"], match["reference"]
        # distribution answers MANIFEST_UNKNOWN for a repository it does not know too: its tag list tells
        manifest_unknown = match["kind"] == "manifests" and "MANIFEST_UNKNOWN" in said
        if "NAME_UNKNOWN" in said or (manifest_unknown and not self._known(repository)):
            return NotFoundError(f"{url}: no repository {repository} at {self.host}")
        if manifest_unknown:
            what = f"no image {reference}" if reference.startswith("sha256:") else f"no tag {reference}"
            listing = f"sepstore tags oci://{self.host}/{repository}"
            return NotFoundError(f"{url}: {what} in repository {repository}; list its tags with `{listing}`")
        return NotFoundError(f"{url}: not found{detail}")

    def _known(self, repository: str) -> bool:
        """Whether the registry knows ``repository`` (by its tag list; ``True`` where that fails otherwise)."""
        try:
            self.request("GET", f"/v2/{repository}/tags/list?n=1", scope=self.scope(repository)).close()
        except NotFoundError:
            return False
        except (RegistryError, IntegrityError):
            pass
        return True

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
        if not _TOKEN.fullmatch(token):
            raise RegistryAuthError(
                f"{token_url}: the token service's token is not {_MAX_TOKEN_CHARS} printable ASCII characters "
                "or fewer; refused"
            )
        seconds = lifetime if isinstance(lifetime, int | float) and lifetime > 0 else 60
        with self._lock:
            self._tokens[scope] = (token, time.monotonic() + max(seconds - 5, 1))

    @staticmethod
    def scope(repository: str, *actions: str) -> str:
        return f"repository:{repository}:{','.join(actions or ('pull',))}"
