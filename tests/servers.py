"""Real servers on 127.0.0.1 for the remote tests: moto's S3 and an aiohttp static file server.

Both record the requests they receive and can be told to misbehave, so tests can count what a
client fetched and check how it survives faults.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web
from moto.server import DomainDispatcherApplication, ThreadedMotoServer, create_backend_app
from werkzeug.serving import make_server


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    #: S3 only: the ``x-amz-copy-source`` of a server-side copy, and the request body's length.
    copy_source: str | None = None
    length: int = 0
    #: HTTP servers only: the request's headers, and the client's port (one per connection).
    headers: dict[str, str] = field(default_factory=dict)
    port: int = 0


@dataclass
class Faults:
    """Misbehaviour for requests whose path contains ``match``: the next ``errors`` are answered
    503, the next ``drops`` cut off mid-body, the next ``stalls`` stop sending mid-body for
    ``stall_seconds``, the next ``flips`` have one bit of their body flipped (HTTP server only for
    the last two)."""

    match: str = ""
    drops: int = 0
    errors: int = 0
    stalls: int = 0
    flips: int = 0
    stall_seconds: float = 30.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, path: str) -> str | None:
        if not self.match or self.match not in path:
            return None
        with self.lock:
            for kind in ("errors", "drops", "stalls", "flips"):
                if getattr(self, kind) > 0:
                    setattr(self, kind, getattr(self, kind) - 1)
                    return kind.removesuffix("s")
        return None


class CountingMotoServer(ThreadedMotoServer):
    """moto's S3 server, wrapped in a WSGI layer that records requests and injects faults."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.requests: list[Request] = []
        self.faults = Faults()

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            method = environ["REQUEST_METHOD"]
            # an aws-chunked body (a checksum trailer) says its own length apart from the framing
            length = int(environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH") or environ.get("CONTENT_LENGTH") or 0)
            copy = environ.get("HTTP_X_AMZ_COPY_SOURCE")
            self.requests.append(Request(method, path, environ.get("HTTP_RANGE"), copy, length))
            fault = self.faults.take(path) if environ["REQUEST_METHOD"] == "GET" else None
            if fault == "error":
                start_response("503 Service Unavailable", [("Content-Length", "0")])
                return [b""]
            body = app(environ, start_response)
            return _cut(body) if fault == "drop" else body

        self._server = make_server(self._ip_address, self._port, wrapped, threaded=True)
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"


def _cut(body: Iterable[bytes]) -> Iterator[bytes]:
    data = b"".join(body)
    yield data[: len(data) // 2]
    raise ConnectionResetError("fault injected: connection dropped mid-body")


def _ranged(data: bytes, header: str | None) -> tuple[bytes, int, dict[str, str]]:
    """The body, status and headers answering a ``Range: bytes=a-b`` request (or a whole one)."""
    if not header or not header.startswith("bytes="):
        return data, 200, {}
    first, _, last = header.removeprefix("bytes=").partition("-")
    start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
    return data[start : end + 1], 206, {"Content-Range": f"bytes {start}-{end}/{len(data)}"}


class _LoopbackServer:
    """An aiohttp server on 127.0.0.1 in a thread of its own, recording requests and faults."""

    methods: tuple[str, ...] = ("GET", "HEAD")
    #: Serve HTTPS with this context (set before :meth:`start`), else plain HTTP.
    tls: ssl.SSLContext | None = None

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.faults = Faults()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        port = peer[1] if isinstance(peer, tuple) else 0
        self.requests.append(
            Request(request.method, request.path, request.headers.get("Range"), None, 0, dict(request.headers), port)
        )
        return await self._handle(request)

    async def _faulty(
        self, request: web.Request, data: bytes, status: int, headers: dict[str, str], fault: str
    ) -> web.StreamResponse:
        """Answer with ``data``, spoilt as ``fault`` says: a flipped bit, or half the body and then
        a dropped connection (after a stall, for ``stall``)."""
        if fault == "flip":
            flipped = bytearray(data)
            if flipped:
                flipped[len(flipped) // 2] ^= 0x10
            return web.Response(body=bytes(flipped), status=status, headers=headers)
        response = web.StreamResponse(status=status, headers={**headers, "Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        if fault == "stall":
            await asyncio.sleep(self.faults.stall_seconds)
        assert request.transport is not None
        request.transport.close()
        return response

    async def _start(self) -> None:
        app = web.Application(client_max_size=2**31)
        for method in self.methods:
            app.router.add_route(method, "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self) -> _LoopbackServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://127.0.0.1:{self.port}"


class StaticServer(_LoopbackServer):
    """A static file server for the files under ``root``, with Range support (``FileResponse``),
    or, with ``ranges=False``, answering every GET with the whole file (as ``python -m http.server``)."""

    def __init__(self, root: Path, *, ranges: bool = True) -> None:
        super().__init__()
        self.root = root
        self.ranges = ranges

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # Only GETs are spoilt (as by FaultProxy): a half body sent after a HEAD's headers stays on a
        # kept-alive connection, and the client's next request there reads it as a bad status line.
        fault = self.faults.take(request.path) if request.method == "GET" else None
        if fault == "error":
            return web.Response(status=503)
        path = (self.root / request.path.lstrip("/")).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            return web.Response(status=404)
        if fault is None and not self.ranges:
            return web.Response(body=path.read_bytes())
        if fault is None:
            return web.FileResponse(path)
        data, status, headers = _ranged(path.read_bytes(), request.headers.get("Range"))
        return await self._faulty(request, data, status, headers, fault)


class FaultProxy(_LoopbackServer):
    """A reverse proxy in front of ``upstream`` (an HTTP server, or moto's S3) that spoils the
    responses to GETs as its ``faults`` say: 503s, dropped connections, stalls, flipped bits."""

    methods = ("GET", "HEAD", "PUT", "POST", "DELETE")
    _HOP = ("host", "content-length", "transfer-encoding", "connection", "content-encoding")

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream.rstrip("/")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = self.faults.take(request.path) if request.method == "GET" else None
        if fault == "error":
            return web.Response(status=503)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self._HOP}
        async with (
            ClientSession(auto_decompress=False) as session,
            session.request(
                request.method, self.upstream + request.path_qs, headers=headers, data=await request.read()
            ) as answer,
        ):
            data = await answer.read()
            back = {k: v for k, v in answer.headers.items() if k.lower() not in self._HOP}
            status = answer.status
        if request.method == "HEAD":
            length = answer.headers.get("Content-Length")
            return web.Response(status=status, headers={**back, **({"Content-Length": length} if length else {})})
        if fault is None:
            return web.Response(body=data, status=status, headers=back)
        return await self._faulty(request, data, status, back, fault)


class HostileServer(_LoopbackServer):
    """Serves the files under ``root`` (with ``Range`` support), except that GETs of paths that
    contain ``spoil`` (part files, by default) are answered as ``mode`` says, never holding more
    than a MiB of the answer at once:

    - ``"huge"``: ``huge_bytes`` of zeros, declared in ``Content-Length``, whatever was asked for;
    - ``"huge-chunked"``: the same without a declared length (chunked encoding);
    - ``"trickle"``: the right headers, then one byte of the right answer every ``trickle_seconds``.

    With ``spare_heads``, ranges from a file's first byte (a safetensors header) are answered honestly.
    """

    methods = ("GET", "HEAD")

    def __init__(
        self,
        root: Path,
        mode: str,
        *,
        spoil: str = "/parts/blake3/",
        huge_bytes: int = 3 * 2**29,
        trickle_seconds: float = 0.5,
        spare_heads: bool = False,
    ) -> None:
        super().__init__()
        self.root = root
        self.mode = mode
        self.spoil = spoil
        self.huge_bytes = huge_bytes
        self.trickle_seconds = trickle_seconds
        self.spare_heads = spare_heads

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = (self.root / request.path.lstrip("/")).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            return web.Response(status=404)
        head = self.spare_heads and request.headers.get("Range", "").startswith("bytes=0-")
        if request.method != "GET" or self.spoil not in request.path or head:
            return web.FileResponse(path)
        if self.mode == "trickle":
            data, status, headers = _ranged(path.read_bytes(), request.headers.get("Range"))
            return await self._send(request, status, {**headers, "Content-Length": str(len(data))}, data)
        headers = {} if self.mode == "huge-chunked" else {"Content-Length": str(self.huge_bytes)}
        return await self._send(request, 200, headers, None)

    async def _send(
        self, request: web.Request, status: int, headers: dict[str, str], data: bytes | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers=headers)
        if "Content-Length" not in headers:
            response.enable_chunked_encoding()
        await response.prepare(request)
        zeros = bytes(2**20)
        try:
            if data is not None:  # trickle
                for i in range(len(data)):
                    await response.write(data[i : i + 1])
                    await asyncio.sleep(self.trickle_seconds)
            else:
                for start in range(0, self.huge_bytes, len(zeros)):
                    await response.write(zeros[: min(len(zeros), self.huge_bytes - start)])
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client hung up, as it should
        return response
