"""Retrying remote reads: transient failures (dropped connections, timeouts, 5xx) get a few more
tries with exponential backoff; anything else is translated at once."""

from __future__ import annotations

import asyncio
import random
import ssl
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import NotFoundError, SepstoreError, StoreError

__all__ = [
    "ATTEMPTS",
    "ShortReadError",
    "StalledError",
    "TransientError",
    "backoff",
    "certificate_refused",
    "http_status",
    "is_transient",
    "with_retries",
]

T = TypeVar("T")
ATTEMPTS = 5
BASE_DELAY = 0.2


def _loaded(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """Exception classes of a backend library (aiohttp behind fsspec's HTTP and s3fs, botocore),
    looked up only once it is imported: until then none of its errors can have been raised, and
    commands that stay on local disk do not pay for importing it."""
    loaded = sys.modules.get(module)
    return tuple(getattr(loaded, name) for name in names) if loaded is not None else ()


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an error answer from an HTTP or S3 server, else ``None``."""
    if isinstance(exc, (*_loaded("aiohttp", "ClientResponseError"), *_loaded("sepstore.httpio", "HTTPStatusError"))):
        status = getattr(exc, "status", None)
        return status if isinstance(status, int) else None
    return None


def _s3_status(exc: BaseException) -> int | None:
    """The HTTP status of an S3 error answer: s3fs raises one as an ``OSError`` caused by botocore's
    ``ClientError`` (after botocore turned a 200 that says "InternalError" into a 500)."""
    answer = exc.__cause__ if isinstance(exc, OSError) else exc
    if not isinstance(answer, _loaded("botocore.exceptions", "ClientError")):
        return None
    status = getattr(answer, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


class TransientError(StoreError):
    """A failure of one transfer that another try may not have."""


class ShortReadError(TransientError):
    """A server sent fewer bytes than asked for."""


class StalledError(TransientError):
    """A transfer delivered too little for too long (``$SEPSTORE_MIN_SPEED``, see :mod:`sepstore.backends`)."""


def certificate_refused(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it wraps) is a TLS certificate that did not verify: final,
    since another try gets the same certificate."""
    refused = (ssl.SSLCertVerificationError, *_loaded("aiohttp", "ClientConnectorCertificateError"))
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        error = pending.pop()
        if not isinstance(error, BaseException) or id(error) in seen:
            continue
        if isinstance(error, refused):
            return True
        seen.add(id(error))
        pending += [error.__cause__, error.__context__, *error.args]  # urllib3 wraps ssl's error in args
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether another try could succeed: not for missing objects, refusals, bad requests or
    certificates that do not verify."""
    if isinstance(exc, FileNotFoundError | PermissionError | NotImplementedError) or certificate_refused(exc):
        return False
    status = http_status(exc) or _s3_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    # S3 bodies are read through botocore, whose errors on the way are its own: a dropped connection,
    # a body shorter than its length, a CRC mismatch (corruption in transit) are all worth a retry
    in_transit = _loaded(
        "botocore.exceptions", "FlexibleChecksumError", "HTTPClientError", "ConnectionError", "IncompleteReadError"
    )
    transient = (TransientError, asyncio.TimeoutError, TimeoutError, ConnectionError, OSError)
    return isinstance(exc, (*transient, *_loaded("aiohttp", "ClientError"), *in_transit))


def backoff(attempt: int) -> float:
    """Seconds to wait after failed try number ``attempt``: doubling from :data:`BASE_DELAY`, jittered."""
    return BASE_DELAY * 2 ** (attempt - 1) * (0.5 + random.random())


def with_retries(call: Callable[[], T], url: str, *, attempts: int | None = None) -> T:
    """``call()``, retried on transient errors (``attempts`` tries in all, default :data:`ATTEMPTS`);
    the last failure becomes a ``StoreError`` naming ``url``."""
    attempts = ATTEMPTS if attempts is None else attempts
    attempt = 0
    while True:
        attempt += 1
        failure: BaseException
        try:
            return call()
        except NotFoundError:
            raise  # sepstore's own: it says what is missing
        except FileNotFoundError as exc:
            # fsspec's HTTP filesystem reports any failed look-up as "not found", the real failure
            # (a 503, a dropped connection) as its cause: only a cause that is not transient is final
            if exc.__cause__ is None or not is_transient(exc.__cause__):
                raise NotFoundError(f"{url}: not found") from None
            failure = exc.__cause__
        except Exception as exc:
            if isinstance(exc, SepstoreError) and not isinstance(exc, TransientError):
                raise
            failure = exc
        if certificate_refused(failure):
            raise StoreError(
                f"{url}: the server's TLS certificate did not verify ({failure}); if it is signed by a CA "
                "of your own, name its certificate in $SSL_CERT_FILE (or a folder of them in $SSL_CERT_DIR)"
            ) from failure
        if not is_transient(failure) or attempt == attempts:
            tries = f" after {attempt} tries" if attempt > 1 else ""
            kind = "" if isinstance(failure, TransientError) else f"{type(failure).__name__}: "
            raise StoreError(f"{url}: {kind}{failure}{tries}") from failure
        time.sleep(backoff(attempt))
