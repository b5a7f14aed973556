"""Retrying remote reads: transient failures (dropped connections, timeouts, 5xx) get a few more
tries with exponential backoff; anything else is translated at once."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import NotFoundError, StoreError

__all__ = ["ATTEMPTS", "is_transient", "with_retries"]

T = TypeVar("T")
ATTEMPTS = 5
BASE_DELAY = 0.2

try:  # aiohttp backs fsspec's HTTP and s3fs; it is there whenever those are
    from aiohttp import ClientError, ClientResponseError
except ImportError:  # pragma: no cover - only without aiohttp
    ClientError = ClientResponseError = OSError  # type: ignore[assignment, misc]


try:  # botocore checks S3 bodies against their CRC: a mismatch is corruption in transit, worth a retry
    from botocore.exceptions import FlexibleChecksumError

    _IN_TRANSIT: tuple[type[BaseException], ...] = (FlexibleChecksumError,)
except ImportError:  # pragma: no cover - only without s3fs
    _IN_TRANSIT = ()


class ShortReadError(StoreError):
    """A server sent fewer bytes than asked for."""


def is_transient(exc: BaseException) -> bool:
    """Whether another try could succeed: not for missing objects, refusals or bad requests."""
    if isinstance(exc, FileNotFoundError | PermissionError | NotImplementedError):
        return False
    if isinstance(exc, ClientResponseError):
        return exc.status >= 500 or exc.status in (408, 429)
    transient = (
        ShortReadError,
        ClientError,
        asyncio.TimeoutError,
        TimeoutError,
        ConnectionError,
        OSError,
        *_IN_TRANSIT,
    )
    return isinstance(exc, transient)


def with_retries(call: Callable[[], T], url: str, *, attempts: int = ATTEMPTS) -> T:
    """``call()``, retried on transient errors; the last failure becomes a ``StoreError`` naming ``url``."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except FileNotFoundError:
            raise NotFoundError(f"{url}: not found") from None
        except Exception as exc:
            if isinstance(exc, StoreError) and not isinstance(exc, ShortReadError):
                raise
            if not is_transient(exc) or attempt == attempts:
                tries = f" after {attempt} tries" if attempt > 1 else ""
                raise StoreError(f"{url}: {type(exc).__name__}: {exc}{tries}") from exc
            time.sleep(BASE_DELAY * 2 ** (attempt - 1) * (0.5 + random.random()))
