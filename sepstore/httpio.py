"""A small blocking HTTP/1.1 client for GETs of large bodies, with a pool of kept-alive connections
per host: each read lands straight in the caller's memory (one ``recv_into``, the GIL released while
it waits), in the calling thread, so several threads receive at once. fsspec's HTTP filesystem runs
every transfer in one event-loop thread and copies each piece out of aiohttp's buffers, which holds a
pull from a fast server to about half of what the link carries (``tests/benchmarks/bench_remote.py``).

Every wait for the network is bounded twice: each ``recv`` by ``read_timeout``, and the headers and
each read of the body by a ``deadline`` (a :func:`time.monotonic` instant) the caller gives and may
move on, so a server that trickles bytes cannot hold a transfer past it. A new connection waits at
most ``connect_timeout`` (and never past the deadline) for the host's address, then as long again for
each address it tries: ``getaddrinfo`` has no timeout of its own, so the lookup runs in a thread of
its own that a resolver that never answers holds instead of the transfer. HTTPS verifies the server's
certificate and name (the system's CA store, ``$SSL_CERT_FILE``); redirects are followed as aiohttp
follows them (at most :data:`REDIRECTS`, to ``http(s)`` only, credentials not carried to another
origin).
"""

from __future__ import annotations

import http.client
import io
import os
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from functools import partial
from typing import Any
from urllib.parse import urljoin, urlsplit

__all__ = ["REDIRECTS", "HTTPProtocolError", "HTTPStatusError", "LookupTimeoutError", "Response", "get"]

REDIRECTS = 10
_REDIRECTED = frozenset((301, 302, 303, 307, 308))
#: Headers not carried over a redirect to another origin (as aiohttp and urllib3 do).
_CREDENTIALS = frozenset(("authorization", "cookie", "proxy-authorization"))
#: Kept-alive connections older than this are closed rather than reused (a server closes idle ones).
IDLE_SECONDS = 10.0
MAX_IDLE = 16
#: Headers and small reads go through a buffer of this size; larger reads go straight to the caller.
_BUFFER = 64 * 1024

_Key = tuple[str, str, int]
_Address = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


class HTTPStatusError(OSError):
    """An answer with an error status (a 404 is a ``FileNotFoundError`` instead); whether another try
    may help is for the status to say (:func:`sepstore.retry.is_transient`)."""

    def __init__(self, url: str, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason} for {url}")
        self.status, self.url = status, url


class HTTPProtocolError(ConnectionError):
    """An answer that breaks HTTP/1.1 (a bad status line, a cut chunk): the connection is dropped."""


class LookupTimeoutError(TimeoutError):
    """The address of a host was not found in time (a DNS server that does not answer)."""


class _Timing:
    """The limits of a connection's waits, set before each request and read."""

    def __init__(self, read_timeout: float) -> None:
        self.read_timeout = read_timeout
        self.deadline = float("inf")


class _TimedSocket(io.RawIOBase):
    """A socket's bytes, each ``recv`` waiting at most ``read_timeout`` and never past ``deadline``."""

    def __init__(self, sock: Any, timing: _Timing) -> None:
        super().__init__()
        self._sock, self._timing = sock, timing
        self._io = sock.makefile("rb", buffering=0)  # keeps the socket open while the answer is read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wait = min(self._timing.read_timeout, self._timing.deadline - time.monotonic())
        if wait <= 0:
            raise TimeoutError("timed out")
        self._sock.settimeout(wait)
        got: int = self._io.readinto(buffer)
        return got

    def close(self) -> None:
        self._io.close()
        super().close()


class _Answer(http.client.HTTPResponse):
    """http.client's response, its bytes read through a :class:`_TimedSocket`."""

    def __init__(self, sock: Any, *args: Any, timing: _Timing, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()
        self.fp = io.BufferedReader(_TimedSocket(sock, timing), _BUFFER)


def _connection(key: _Key, connect_timeout: float, deadline: float) -> http.client.HTTPConnection:
    """A new connection, connected within ``connect_timeout`` and before ``deadline``."""
    scheme, host, port = key
    timeout = min(connect_timeout, max(deadline - time.monotonic(), 0.001))
    conn: http.client.HTTPConnection
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=_tls())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn._create_connection = partial(_open_socket, connect_timeout=connect_timeout)  # type: ignore[attr-defined]
    timing = _Timing(timeout)
    conn.timing = timing  # type: ignore[attr-defined]
    conn.response_class = partial(_Answer, timing=timing)  # type: ignore[assignment]
    conn.connect()
    return conn


def _open_socket(
    address: tuple[str, int], timeout: float, source: tuple[str, int] | None = None, *, connect_timeout: float
) -> socket.socket:
    """:func:`socket.create_connection`, its address lookup bounded by ``timeout`` too: a TCP socket
    connected to the first of the host's addresses that answers (IPv4 or IPv6), each tried for at
    most ``timeout`` seconds (``connect_timeout``, or less where the transfer's deadline is nearer);
    else the last address's failure, as :func:`socket.create_connection` raises it."""
    host, port = address
    try:
        found = _LOOKUPS.addresses(host, port, timeout)
    except LookupTimeoutError:
        # cut short by the transfer's deadline (less than half the connect timeout was left): its
        # timeout, not the resolver's failure (a lookup given a whole window that ran out is that)
        if timeout < connect_timeout / 2:
            raise TimeoutError(f"{host}: timed out looking up its address at the transfer's deadline") from None
        raise
    failures: list[OSError] = []
    for family, kind, protocol, _, target in found:
        sock = socket.socket(family, kind, protocol)
        try:
            sock.settimeout(timeout)
            if source is not None:
                sock.bind(source)
            sock.connect(target)
        except OSError as exc:
            sock.close()
            failures.append(exc)
        else:
            return sock
    raise failures[-1] if failures else OSError(f"{host}: getaddrinfo found no address")


class _Lookups:
    """Address lookups under way, by host and port, each in a daemon thread of its own (which cannot
    keep the interpreter from exiting): connections to a host whose lookup hangs all wait on that
    one, so a resolver that never answers holds one thread per host, not one per try."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], futures.Future[list[_Address]]] = {}

    def addresses(self, host: str, port: int, timeout: float) -> list[_Address]:
        """``host``'s addresses for a TCP connection to ``port``, waited for at most ``timeout`` seconds."""
        with self._lock:
            lookup = self._pending.get((host, port))
            if lookup is None:
                lookup = futures.Future()
                thread = threading.Thread(target=self._run, args=(host, port, lookup), daemon=True)
                thread.start()  # before the lookup is shared: one that never started would never end
                self._pending[host, port] = lookup
        try:
            return lookup.result(timeout)
        except futures.TimeoutError:  # TimeoutError itself from Python 3.11
            raise LookupTimeoutError(
                f"{host}: its address was not found in {timeout:.3g} s (the DNS resolver did not answer)"
            ) from None

    def _run(self, host: str, port: int, lookup: futures.Future[list[_Address]]) -> None:
        try:
            found = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except Exception as exc:
            failure: Exception | None = exc
        else:
            failure = None
        with self._lock:
            if self._pending.get((host, port)) is lookup:
                del self._pending[host, port]
        if failure is None:
            lookup.set_result(found)
        else:
            lookup.set_exception(failure)

    def forget(self) -> None:
        """Drop every lookup (in a forked child: their threads are not there)."""
        self._lock = threading.Lock()
        self._pending = {}


_LOOKUPS = _Lookups()


_contexts: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def _tls() -> ssl.SSLContext:
    """A verifying TLS context, one per CA store (``$SSL_CERT_FILE``, ``$SSL_CERT_DIR`` or the
    system's): loading a CA store is slow."""
    paths = ssl.get_default_verify_paths()
    key = (paths.cafile, paths.capath)
    context = _contexts.get(key)
    if context is None:
        context = _contexts[key] = ssl.create_default_context()
    return context


class _Pool:
    """Idle kept-alive connections, per scheme, host and port; safe for several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[_Key, list[tuple[float, http.client.HTTPConnection]]] = {}

    def take(self, key: _Key) -> http.client.HTTPConnection | None:
        """The most recently used idle connection to ``key`` (``None`` if there is none)."""
        oldest = time.monotonic() - IDLE_SECONDS
        with self._lock:
            idle = self._idle.get(key, [])
            stale = [conn for since, conn in idle if since < oldest]
            idle[:] = [(since, conn) for since, conn in idle if since >= oldest]
            conn = idle.pop()[1] if idle else None
        for old in stale:
            old.close()
        return conn

    def give(self, key: _Key, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            idle.append((time.monotonic(), conn))
            extra = idle[:-MAX_IDLE]
            del idle[:-MAX_IDLE]
        for old in extra:
            old[1].close()

    def forget(self) -> None:
        """Drop every connection unclosed (in a forked child: the parent's are not its own to close)."""
        self._lock = threading.Lock()
        self._idle = {}


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL.forget)
os.register_at_fork(after_in_child=_LOOKUPS.forget)


class Response:
    """An answer to :func:`get`: its final URL, status, headers and declared body length (``None``
    where the body is chunked or ends when the connection does), and its body through
    :meth:`readinto`. Closed, its connection goes back to the pool if the body was read to its end."""

    def __init__(self, url: str, key: _Key, conn: http.client.HTTPConnection, answer: _Answer) -> None:
        self.url, self._key, self._conn, self._answer = url, key, conn, answer
        self.status: int = answer.status
        self.reason: str = answer.reason
        self.headers = answer.headers
        self.length: int | None = None if answer.chunked else answer.length
        self._ended = answer.length == 0 and not answer.chunked

    def readinto(self, into: memoryview, deadline: float) -> int:
        """Receive the next bytes into ``into`` with at most one ``recv`` where the body's length is
        declared (straight into ``into``); how many (none once the body is over)."""
        if self._ended or not len(into):
            return 0
        answer = self._answer
        answer_fp = answer.fp
        if answer_fp is None:
            return 0
        self._conn.timing.deadline = deadline  # type: ignore[attr-defined]
        try:
            if answer.length is not None and not answer.chunked:
                got: int = answer_fp.readinto1(into[: min(len(into), answer.length)])
                if not got:
                    raise HTTPProtocolError(
                        f"{self.url}: the connection closed {answer.length} bytes before the body's end"
                    )
                answer.length -= got
                self._ended = answer.length == 0
            else:
                data = answer.read1(len(into))
                got = len(data)
                into[:got] = data
                self._ended = not got
        except http.client.HTTPException as exc:
            raise HTTPProtocolError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        return got

    def close(self) -> None:
        reuse = self._ended and not self._answer.will_close
        self._answer.close()
        if reuse:
            _POOL.give(self._key, self._conn)
        else:
            self._conn.close()


def get(
    url: str,
    headers: Mapping[str, str],
    *,
    connect_timeout: float,
    read_timeout: float,
    deadline: float,
) -> Response:
    """``GET url`` with ``headers``, following redirects; the answer once its headers are in (its
    body still to read). A 404 is a ``FileNotFoundError``, another status of 400 or more an
    :class:`HTTPStatusError`; waits are bounded as the module says."""
    sent = dict(headers)
    for _ in range(REDIRECTS + 1):
        response = _get_once(url, sent, connect_timeout, read_timeout, deadline)
        location = response.headers.get("Location")
        if response.status not in _REDIRECTED or not location:
            break
        response.close()
        target = urljoin(url, location)
        if urlsplit(target).scheme not in ("http", "https"):
            raise HTTPStatusError(url, response.status, f"redirect to {target}, which is not HTTP(S)")
        if _origin(target) != _origin(url):
            sent = {k: v for k, v in sent.items() if k.lower() not in _CREDENTIALS}
        url = target
    else:
        response.close()
        raise HTTPStatusError(url, response.status, f"after {REDIRECTS} redirects")
    if response.status >= 400:
        response.close()
        if response.status == 404:
            raise FileNotFoundError(url)
        raise HTTPStatusError(url, response.status, response.reason)
    return response


def _origin(url: str) -> _Key:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _get_once(
    url: str, headers: dict[str, str], connect_timeout: float, read_timeout: float, deadline: float
) -> Response:
    """One GET on a kept-alive connection if the pool has one (and a new one if that one turns out to
    have been closed by the server meanwhile), else on a new connection."""
    key = _origin(url)
    if key[0] not in ("http", "https") or not key[1]:
        raise ValueError(f"not an HTTP(S) URL: {url!r}")
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    while True:
        conn = _POOL.take(key)
        reused = conn is not None
        if conn is None:
            conn = _connection(key, connect_timeout, deadline)
        timing: _Timing = conn.timing  # type: ignore[attr-defined]
        timing.read_timeout, timing.deadline = read_timeout, deadline
        try:
            assert conn.sock is not None
            conn.sock.settimeout(max(min(read_timeout, deadline - time.monotonic()), 0.001))
            conn.request("GET", target, headers=headers)
            answer = conn.getresponse()
        except (ConnectionError, http.client.BadStatusLine) as exc:
            conn.close()
            if reused:
                continue  # the server closed the idle connection: a new one
            if isinstance(exc, http.client.HTTPException):
                raise HTTPProtocolError(f"{url}: {type(exc).__name__}: {exc}") from exc
            raise
        except http.client.HTTPException as exc:
            conn.close()
            raise HTTPProtocolError(f"{url}: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        assert isinstance(answer, _Answer)
        return Response(url, key, conn, answer)
