"""Opening fsspec filesystems with sepstore's defaults: timeouts, so that a stalled server fails
(and is retried) instead of hanging a node forever.

``$SEPSTORE_TIMEOUT`` (seconds, default 60) bounds connecting and each read from the network for
HTTP(S) and S3; options a caller passes in ``storage_options`` win over these defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.core import split_protocol

from .errors import StoreError

__all__ = ["open_url", "timeout", "with_defaults"]


def timeout() -> float:
    """Seconds a connection or a single network read may take (``$SEPSTORE_TIMEOUT``, default 60)."""
    try:
        return float(os.environ.get("SEPSTORE_TIMEOUT", "60"))
    except ValueError:
        raise StoreError(
            f"SEPSTORE_TIMEOUT must be a number of seconds, not {os.environ['SEPSTORE_TIMEOUT']!r}"
        ) from None


def with_defaults(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` plus sepstore's timeouts for the URL's protocol."""
    options = dict(storage_options or {})
    protocol = split_protocol(url)[0]
    seconds = timeout()
    if protocol in ("http", "https"):
        from aiohttp import ClientTimeout

        client = dict(options.get("client_kwargs") or {})
        client.setdefault("timeout", ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds))
        options["client_kwargs"] = client
    elif protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", seconds)
        config.setdefault("read_timeout", seconds)
        options["config_kwargs"] = config
    return options


def open_url(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of ``url``, with sepstore's defaults; a ``StoreError`` if it cannot be opened."""
    try:
        return fsspec.core.url_to_fs(url, **with_defaults(url, storage_options))
    except (ImportError, ValueError, TypeError) as exc:
        raise StoreError(f"cannot open {url!r}: {exc}") from exc
