"""Opening fsspec filesystems with sepstore's defaults, and reading byte ranges of remote objects
in bounded pieces: whatever a server sends, a transfer holds at most :data:`PIECE_BYTES` of it in
memory, stops at the length it asked for, and cannot hang forever.

``$SEPSTORE_TIMEOUT`` (seconds, default 60) bounds connecting and each read from the network for
HTTP(S) and S3; options a caller passes in ``storage_options`` win over these defaults.

S3 is retried at two levels, no more. Each of sepstore's operations (a read, a write, a listing)
gets :data:`~sepstore.retry.ATTEMPTS` tries (:func:`~sepstore.retry.with_retries`, backoff from
0.2 s). Within a try, botocore sends each request at most :data:`S3_REQUEST_ATTEMPTS` times
(standard mode: again on a 5xx, a throttle, a dropped or timed-out connection), which retries one
part of a multipart upload, or an abort, without redoing the whole; unless the user set botocore's
retries (``config_kwargs={"retries": ...}``, ``$AWS_MAX_ATTEMPTS``/``$AWS_RETRY_MODE``, or
``max_attempts``/``retry_mode`` in the AWS config file), which are then theirs. s3fs's own retry
loop (``S3FileSystem.retries``, 5 tries around each call) is set to one try. So an S3 endpoint that
answers every request 503, or never answers, costs ``ATTEMPTS * S3_REQUEST_ATTEMPTS`` (10)
requests per operation before it fails, a hanging one ``$SEPSTORE_TIMEOUT`` for each; except a
ranged read of an object, which the minimum-progress window below cuts at ``$SEPSTORE_TIMEOUT``
with its request: ``ATTEMPTS`` (5) requests.

``$SEPSTORE_MIN_SPEED`` (bytes per second, default 16384) is the least a transfer must keep up: one
that delivers fewer than ``SEPSTORE_MIN_SPEED * SEPSTORE_TIMEOUT`` bytes in any window of
``SEPSTORE_TIMEOUT`` seconds (a server trickling a byte at a time, which no read timeout catches)
is aborted with a :class:`~sepstore.retry.StalledError`, retried, then fails naming the URL. ``0``
leaves only the rule that some byte must come in every window.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.asyn import sync
from fsspec.core import split_protocol

from .errors import IntegrityError, StoreError
from .retry import ShortReadError, StalledError

__all__ = [
    "PIECE_BYTES",
    "RangeBody",
    "can_list",
    "min_speed",
    "open_range",
    "open_url",
    "read_head",
    "stream_body",
    "stream_range",
    "timeout",
    "with_defaults",
]

T = TypeVar("T")

#: A transfer reads from the network, and hands on, pieces of at most this many bytes.
PIECE_BYTES = 4 * 1024 * 1024

#: How many times botocore sends each S3 request, inside each of sepstore's tries (see above).
S3_REQUEST_ATTEMPTS = 2


def _env_number(name: str, default: str, unit: str, *, positive: bool = False) -> float:
    value = os.environ.get(name, default)
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not (number > 0 if positive else number >= 0) or number == float("inf"):
        raise StoreError(f"{name} must be a number of {unit} {'> 0' if positive else '>= 0'}, not {value!r}")
    return number


def timeout() -> float:
    """Seconds a connection or a single network read may take (``$SEPSTORE_TIMEOUT``, default 60)."""
    return _env_number("SEPSTORE_TIMEOUT", "60", "seconds", positive=True)


def min_speed() -> float:
    """Bytes per second a transfer must keep up over each ``$SEPSTORE_TIMEOUT`` window
    (``$SEPSTORE_MIN_SPEED``, default 16384)."""
    return _env_number("SEPSTORE_MIN_SPEED", "16384", "bytes per second")


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
        if "retries" not in config and not _aws_retries_configured(options.get("profile")):
            config["retries"] = {"total_max_attempts": S3_REQUEST_ATTEMPTS, "mode": "standard"}
        options["config_kwargs"] = config
    return options


def _aws_retries_configured(profile: object) -> bool:
    """Whether the user set botocore's retries (``$AWS_MAX_ATTEMPTS``, ``$AWS_RETRY_MODE``, or the
    AWS config file's ``max_attempts``/``retry_mode`` for ``profile``): a ``retries`` in the client's
    options would override them."""
    import botocore.exceptions
    import botocore.session

    if os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE"):
        return True
    session = botocore.session.Session(profile=profile if isinstance(profile, str) else None)
    try:
        scoped = session.get_scoped_config()
    except botocore.exceptions.BotoCoreError:  # no such profile: the S3 client will say so
        return False
    return "max_attempts" in scoped or "retry_mode" in scoped


def open_url(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of ``url``, with sepstore's defaults; a ``StoreError`` if it cannot be opened."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **with_defaults(url, storage_options))
    except (ImportError, ValueError, TypeError) as exc:
        raise StoreError(f"cannot open {url!r}: {exc}") from exc
    if _is(fs, "s3fs.core", "S3FileSystem"):
        fs.retries = 1  # s3fs's own loop around each call: botocore and sepstore retry (see above)
    return fs, path


# -- streaming ranged reads ------------------------------------------------------------------------


class _Progress:
    """The minimum-progress rule: each window of ``$SEPSTORE_TIMEOUT`` seconds must bring
    ``$SEPSTORE_MIN_SPEED`` times as many bytes (at least one)."""

    def __init__(self) -> None:
        self.window = timeout()
        self.least = max(1, int(min_speed() * self.window))
        self.began = time.monotonic()
        self.got = 0

    def deadline(self) -> float:
        """When the current window ends (a :func:`time.monotonic` instant)."""
        return self.began + self.window

    def remaining(self) -> float:
        """Seconds left in the current window (none once it is over)."""
        return self.deadline() - time.monotonic()

    def left(self) -> float:
        """Seconds left in the current window; a :class:`StalledError` once it is over."""
        left = self.remaining()
        if left <= 0:
            raise self.stalled()
        return left

    def stalled(self) -> StalledError:
        return StalledError(
            f"stalled, {self.got} bytes in {self.window:g} s, fewer than the {self.least} "
            "that $SEPSTORE_MIN_SPEED and $SEPSTORE_TIMEOUT ask for"
        )

    def add(self, count: int) -> None:
        self.got += count
        if self.got >= self.least:
            self.began, self.got = time.monotonic(), 0


class _Body:
    """An answer to a ranged read: whether it is one (else the server sent the whole object), where
    its first byte is in the object, the length it declares and the object's size (if it says),
    and its bytes, piece by piece."""

    ranged: bool = True
    offset: int = 0
    length: int | None = None
    total: int | None = None

    def read(self, size: int) -> bytes:
        """At most ``size`` of the next bytes (at least one, unless the body is over)."""
        raise NotImplementedError

    def readinto(self, into: memoryview) -> int:
        """Fill ``into`` with the next bytes; how many there were (fewer only where the body ends)."""
        got = 0
        while got < len(into) and (data := self.read(len(into) - got)):
            into[got : got + len(data)] = data
            got += len(data)
        return got

    def close(self) -> None:
        raise NotImplementedError


#: The type of an answer to a ranged read, as stores' ``open_blob_range`` return it.
RangeBody = _Body


class _FileBody(_Body):
    """Any fsspec filesystem, through its buffered file object (blocks of at most ``PIECE_BYTES``)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, start: int, end: int) -> None:
        self._file = fs.open(path, "rb", block_size=PIECE_BYTES)
        size = getattr(self._file, "size", None)
        self.total = size if isinstance(size, int) else None
        self._file.seek(start)
        self.offset, self.length, self._left = start, end - start, end - start

    def read(self, size: int) -> bytes:
        data: bytes = self._file.read(min(size, self._left))
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._file.close()


class _AsyncBody(_Body):
    """A response of an fsspec async filesystem (HTTP, S3), read from its event loop piece by piece,
    each wait bounded by the minimum-progress rule."""

    def __init__(self, fs: Any) -> None:
        self._loop = fs.loop
        self._progress = _Progress()

    def _await(self, make: Callable[[], Awaitable[T]]) -> T:
        result: T = sync(self._loop, self._within, make)
        return result

    async def _within(self, make: Callable[[], Awaitable[T]]) -> T:
        try:
            return await asyncio.wait_for(make(), self._progress.left())
        except asyncio.TimeoutError:
            if self._progress.remaining() <= 0:  # the window is over, not a timeout of the backend's own
                raise self._progress.stalled() from None
            raise

    def read(self, size: int) -> bytes:
        data = self._await(lambda: self._read(size))
        self._progress.add(len(data))
        return data

    def readinto(self, into: memoryview) -> int:
        """Fill ``into`` in one trip to the event loop (not one per network read): each read waits
        only as long as the minimum-progress rule allows."""
        got: int = sync(self._loop, self._fill, into)
        return got

    async def _fill(self, into: memoryview) -> int:
        got = 0
        while got < len(into):
            want = len(into) - got
            data = self._read_nowait(want) or await self._within(lambda want=want: self._read(want))
            if not data:
                break
            into[got : got + len(data)] = data
            got += len(data)
            self._progress.add(len(data))
        return got

    async def _read(self, size: int) -> bytes:
        raise NotImplementedError

    def _read_nowait(self, size: int) -> bytes:
        """Bytes already received, without waiting (none, where the backend cannot say)."""
        return b""

    def close(self) -> None:
        sync(self._loop, self._close)

    async def _close(self) -> None:
        raise NotImplementedError


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """Start and total of a ``Content-Range: bytes a-b/total`` value (either ``None`` if not said)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[len("bytes ") :].partition("/")
    first = span.partition("-")[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


class _HTTPBody(_AsyncBody):
    """A GET through fsspec's own aiohttp session (its headers, auth and timeouts), with ``Range``;
    ``Accept-Encoding: identity``, so that the declared length is the length of the bytes."""

    def __init__(self, fs: Any, path: str, start: int, end: int) -> None:
        super().__init__(fs)
        self._response = self._await(lambda: self._get(fs, path, start, end))
        headers = self._response.headers
        first, self.total = _content_range(headers.get("Content-Range"))
        self.ranged = self._response.status == 206
        self.offset = start if first is None else first
        length = headers.get("Content-Length", "")
        encoded = headers.get("Content-Encoding", "identity").lower() != "identity"
        self.length = int(length) if length.isdigit() and not encoded else None

    @staticmethod
    async def _get(fs: Any, path: str, start: int, end: int) -> Any:
        options = dict(fs.kwargs)
        headers = {**options.pop("headers", {}), "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        session = await fs.set_session()
        # read_bufsize: the body is buffered up to a piece (twice that before the socket is paused),
        # not aiohttp's 64 KiB, which pauses and resumes the socket many times a piece
        response = await session.get(fs.encode_url(path), headers=headers, read_bufsize=PIECE_BYTES, **options)
        try:
            fs._raise_not_found_for_status(response, path)
        except BaseException:
            response.close()
            raise
        return response

    async def _read(self, size: int) -> bytes:
        data: bytes = await self._response.content.read(size)
        return data

    def _read_nowait(self, size: int) -> bytes:
        data: bytes = self._response.content.read_nowait(size)
        return data

    async def _close(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # the connection goes back to the pool
        else:
            self._response.close()  # the rest of the body is never read


class _PooledHTTPBody(_Body):
    """A GET through sepstore's own pool of blocking connections (:mod:`sepstore.httpio`): each read
    lands straight where it is asked to, in the thread that asks, with the GIL released while it waits,
    so several transfers receive at once (fsspec's aiohttp session serves them all from one thread).
    Each wait is bounded by the read timeout and by the minimum-progress rule."""

    def __init__(self, url: str, start: int, end: int, options: _PooledOptions) -> None:
        from . import httpio

        self._progress = _Progress()
        self._read_timeout = options.read_timeout
        headers = {**options.headers, "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        self._response = self._timed(
            lambda deadline: httpio.get(
                url,
                headers,
                connect_timeout=options.connect_timeout,
                read_timeout=options.read_timeout,
                deadline=deadline,
            )
        )
        answer = self._response.headers
        first, self.total = _content_range(answer.get("Content-Range"))
        self.ranged = self._response.status == 206
        self.offset = start if first is None else first
        #: An encoded body (``gzip``, though ``identity`` was asked for) is not its object's bytes.
        self.encoded = answer.get("Content-Encoding", "identity").lower() != "identity"
        self.length = None if self.encoded else self._response.length

    def _timed(self, call: Callable[[float], T]) -> T:
        """``call(deadline)``: its timeout at the end of the current window is a :class:`StalledError`
        (not a lookup of the server's address that timed out, which says which host it was)."""
        from .httpio import LookupTimeoutError

        try:
            return call(self._progress.deadline())
        except LookupTimeoutError:
            raise
        except TimeoutError:
            if self._progress.remaining() <= 0:
                raise self._progress.stalled() from None
            raise

    def read(self, size: int) -> bytes:
        buffer = memoryview(bytearray(size))
        got = self._timed(lambda deadline: self._response.readinto(buffer, deadline))
        self._progress.add(got)
        return bytes(buffer[:got])

    def readinto(self, into: memoryview) -> int:
        got = 0
        while got < len(into):
            count = self._timed(lambda deadline, rest=into[got:]: self._response.readinto(rest, deadline))
            if not count:
                break
            got += count
            self._progress.add(count)
        return got

    def close(self) -> None:
        self._response.close()


@dataclass(frozen=True)
class _PooledOptions:
    headers: dict[str, str]
    connect_timeout: float
    read_timeout: float


def _pooled_options(fs: Any) -> _PooledOptions | None:
    """What a GET through :class:`_PooledHTTPBody` needs from the options of fsspec's HTTP filesystem
    ``fs``: request and session headers, and the connect and read timeouts; ``None`` where ``fs`` has
    options it cannot honour (auth, cookies, an SSL context, a proxy, a client of its own), whose GETs
    stay with fsspec's aiohttp session."""
    from fsspec.implementations.http import get_client

    client = dict(fs.client_kwargs)
    limits = client.pop("timeout", None)
    session_headers = client.pop("headers", None) or {}
    request = dict(fs.kwargs)
    request_headers = request.pop("headers", None) or {}
    if client or request or fs.get_client is not get_client:
        return None
    connect = read = timeout()
    if limits is not None:
        from aiohttp import ClientTimeout

        if not isinstance(limits, ClientTimeout) or limits.total is not None or limits.connect is not None:
            return None
        connect = limits.sock_connect if limits.sock_connect is not None else float("inf")
        read = limits.sock_read if limits.sock_read is not None else float("inf")
    headers: dict[str, tuple[str, str]] = {}  # by lowercase name: a request header wins over a session's
    for name, value in [*dict(session_headers).items(), *dict(request_headers).items()]:
        headers[str(name).lower()] = (str(name), str(value))
    return _PooledOptions(dict(headers.values()), connect, read)


def _open_http(fs: Any, path: str, start: int, end: int) -> _Body:
    """A body from sepstore's connection pool where the options allow it, else from fsspec's aiohttp
    session (which also decodes an answer that comes encoded, though ``identity`` was asked for)."""
    options = _pooled_options(fs)
    if options is not None:
        body = _PooledHTTPBody(str(fs.encode_url(path)), start, end, options)
        if not body.encoded:
            return body
        body.close()
    return _HTTPBody(fs, path, start, end)


class _S3Body(_AsyncBody):
    """A ranged ``GetObject`` through s3fs's client, its body read piece by piece."""

    def __init__(self, fs: Any, path: str, start: int, end: int) -> None:
        super().__init__(fs)
        bucket, key, version = fs.split_path(path)
        extra = {"VersionId": version} if version else {}
        answer = self._await(
            lambda: fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **extra)
        )
        self._body = answer["Body"]
        first, self.total = _content_range(answer.get("ContentRange"))
        self.ranged = bool(answer.get("ContentRange"))
        self.offset = start if first is None else first
        length = answer.get("ContentLength")
        self.length = length if isinstance(length, int) else None

    async def _read(self, size: int) -> bytes:
        data: bytes = await self._body.read(size)
        return data

    async def _close(self) -> None:
        await self._body.aclose()


def can_list(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether folders on ``fs`` may be listed: not over HTTP, whose "listings" are HTML pages that
    fsspec reads whole, with no size bound and no minimum-progress rule (a hostile server answered
    with 1 GiB, or a byte every half second), and which most servers refuse anyway."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return not {"http", "https"}.intersection(protocols)


def _is(fs: fsspec.AbstractFileSystem, module: str, name: str) -> bool:
    """Whether ``fs`` is an instance of ``module.name``, looked up only if that module is loaded
    (``fs`` cannot be one otherwise, and local work does not pay for importing aiohttp)."""
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded is not None else None
    return isinstance(cls, type) and isinstance(fs, cls)


def open_range(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int) -> _Body:
    """One read of bytes ``start:end`` of the object at ``path``, its body unread (for :func:`stream_body`)."""
    if _is(fs, "fsspec.implementations.http", "HTTPFileSystem"):
        return _open_http(fs, path, start, end)
    if _is(fs, "s3fs.core", "S3FileSystem"):
        return _S3Body(fs, path, start, end)
    return _FileBody(fs, path, start, end)


def stream_range(
    fs: fsspec.AbstractFileSystem,
    path: str,
    url: str,
    start: int,
    end: int,
    size: int,
    write: Callable[[int, memoryview], None],
    *,
    into: memoryview | None = None,
) -> tuple[int, int]:
    """:func:`stream_body` of the object at ``path`` on ``fs``."""
    return stream_body(open_range(fs, path, start, end), url, start, end, size, write, into=into)


def stream_body(
    body: _Body,
    url: str,
    start: int,
    end: int,
    size: int,
    write: Callable[[int, memoryview], None],
    *,
    into: memoryview | None = None,
) -> tuple[int, int]:
    """Read bytes ``start:end`` of a ``size``-byte object from ``body`` (an answer to a ranged read
    of them, closed here) and hand them to ``write(offset, piece)`` in pieces of at most
    :data:`PIECE_BYTES`, each read into one reused buffer (so ``piece`` is valid only during the
    call: copy it to keep it); returns the span written: ``(start, end)``, or ``(0, size)`` when
    the server ignored ``Range`` and sent the whole object.
    With ``into`` (a writable buffer of ``size`` bytes), a ranged answer is read straight into
    ``into[start:end]`` instead, and each ``piece`` is the view of it that it filled.

    An answer of another size, or for another range, or longer than it says, is an
    :class:`IntegrityError` naming ``url``, found before more than the expected bytes are read;
    a short answer is a :class:`ShortReadError` and a stalled one a :class:`StalledError` (both
    worth another try, see :func:`~sepstore.retry.with_retries`)."""
    try:
        if body.total is not None and body.total != size:
            raise IntegrityError(f"{url}: the server's object is {body.total} bytes, not the {size} expected")
        if body.ranged and body.offset != start:
            raise IntegrityError(f"{url}: asked for bytes {start}-{end - 1}, the server sent bytes from {body.offset}")
        first, last = (start, end) if body.ranged else (0, size)
        expected = last - first
        if body.length is not None and body.length != expected:
            raise IntegrityError(
                f"{url}: the server answered bytes {start}-{end - 1} with {body.length} bytes, expected {expected}"
            )
        done = 0
        # each piece lands in one buffer of its own, or (ranged, with `into`) where it belongs
        buffer = memoryview(bytearray(min(PIECE_BYTES, expected))) if into is None or not body.ranged else None
        while done < expected:
            want = min(PIECE_BYTES, expected - done)
            space = buffer[:want] if buffer is not None else into[first + done : first + done + want]  # type: ignore[index]
            got = body.readinto(space)
            if got:
                write(first + done, space[:got])
                done += got
            if got < want:
                raise ShortReadError(f"got {done} bytes of {expected} (bytes {first}-{last - 1})")
        if body.length is None and body.read(1):
            raise IntegrityError(f"{url}: the server sent more than the {expected} bytes asked for")
        return first, last
    finally:
        body.close()


def read_head(fs: fsspec.AbstractFileSystem, path: str, url: str, limit: int) -> bytes:
    """The first ``limit`` bytes of the object at ``path`` (all of it, if shorter), read in pieces
    under the minimum-progress rule: a longer answer is cut at ``limit``, never held whole."""
    body = open_range(fs, path, 0, limit)
    try:
        if body.ranged and body.offset != 0:
            raise IntegrityError(f"{url}: asked for bytes 0-{limit - 1}, the server sent bytes from {body.offset}")
        pieces: list[bytes] = []
        got = 0
        while got < limit and (piece := body.read(min(PIECE_BYTES, limit - got))):
            pieces.append(piece)
            got += len(piece)
        return b"".join(pieces)
    finally:
        body.close()
