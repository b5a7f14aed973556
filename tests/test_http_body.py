"""Parts over HTTP(S) through sepstore's own connection pool (:mod:`sepstore.httpio`): the options a
user passes reach the server, connections are kept alive and reused, redirects are followed without
carrying credentials to another origin, wrong answers are refused, and HTTPS verifies the server."""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web
from conftest import same_bytes
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from servers import Request, StaticServer

import sepstore
import sepstore.cache
import sepstore.retry
from sepstore import httpio
from sepstore.demo import llama_decider, tiny_llama_state_dict

MANIFEST = "store/manifests/m/v1.json"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A small model's store under ``www/store``, and its state dict."""
    www = tmp_path_factory.mktemp("www")
    sd = tiny_llama_state_dict(layers=2, hidden=32, intermediate=64, vocab=128, seed=15)
    sepstore.dump(llama_decider, sd, www / "store", name="m", tag="v1", quiet=True)
    return www, sd


@pytest.fixture
def www(published: tuple[Path, dict[str, torch.Tensor]]) -> Path:
    return published[0]


@pytest.fixture
def served(www: Path) -> Iterator[StaticServer]:
    server = StaticServer(www).start()
    yield server
    server.stop()


def part_gets(requests: list[Request]) -> list[Request]:
    return [r for r in requests if r.method == "GET" and "/parts/" in r.path]


class Misanswering(StaticServer):
    """Serves ``root``, except that part GETs are answered as ``mode`` says: ``"redirect"`` to the
    same path on ``elsewhere``; ``"shifted"`` or ``"total"``, the asked-for bytes under a
    ``Content-Range`` that says they start a byte later, or that the object is a byte longer."""

    def __init__(self, root: Path, mode: str, elsewhere: str = "") -> None:
        super().__init__(root)
        self.mode, self.elsewhere = mode, elsewhere

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if "/parts/" not in request.path or request.method != "GET":
            return await super()._handle(request)
        if self.mode == "redirect":
            raise web.HTTPFound(self.elsewhere + request.path)
        data = (self.root / request.path.lstrip("/")).read_bytes()
        first, _, last = request.headers["Range"].removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last), len(data) - 1)
        shift, extra = (1, 0) if self.mode == "shifted" else (0, 1)
        span = f"bytes {start + shift}-{end + shift}/{len(data) + extra}"
        return web.Response(body=data[start : end + 1], status=206, headers={"Content-Range": span})


def test_headers_from_storage_options_reach_the_server_on_every_get_over_kept_alive_connections(
    served: StaticServer, published: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(sepstore.cache, "CHUNK_BYTES", 4096)  # many ranged GETs per part
    options = {"headers": {"X-Token": "t1"}, "client_kwargs": {"headers": {"X-Session": "s1", "X-Token": "lost"}}}
    report = sepstore.pull(f"{served.url}/{MANIFEST}", cache_dir=tmp_path, workers=2, storage_options=options)
    gets = [r for r in served.requests if r.method == "GET"]
    assert len(part_gets(gets)) > 10 and len(report.fetched) == 4
    # a request's header wins over the session's of the same name, as in aiohttp
    assert all(r.headers.get("X-Token") == "t1" and r.headers.get("X-Session") == "s1" for r in gets)
    assert all("aiohttp" not in r.headers.get("User-Agent", "") for r in gets), "sepstore's own client, not aiohttp"
    assert len({r.port for r in gets}) <= 3, "two fetching threads, each on a kept-alive connection"
    psd = sepstore.load(f"{served.url}/{MANIFEST}", cache_dir=tmp_path, storage_options=options)
    assert same_bytes(psd.end["norm.weight"], published[1]["model.norm.weight"])  # type: ignore[index]


def test_options_sepstores_client_cannot_honour_are_still_applied(served: StaticServer, tmp_path: Path) -> None:
    """Such as aiohttp's ``cookies``: those GETs stay with fsspec's aiohttp session."""
    sepstore.pull(f"{served.url}/{MANIFEST}", cache_dir=tmp_path, storage_options={"cookies": {"session": "c1"}})
    gets = part_gets(served.requests)
    assert gets and all(r.headers.get("Cookie") == "session=c1" for r in gets)


def test_a_redirected_part_is_followed_and_credentials_stay_with_their_origin(
    www: Path, served: StaticServer, published: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    front = Misanswering(www, "redirect", served.url).start()
    try:
        options = {"headers": {"Authorization": "Bearer front-only", "X-Trace": "t"}}
        psd = sepstore.load(f"{front.url}/{MANIFEST}", cache_dir=tmp_path, storage_options=options)
    finally:
        front.stop()
    assert same_bytes(psd.mid[1]["mlp.up_proj.weight"], published[1]["model.layers.1.mlp.up_proj.weight"])
    assert part_gets(front.requests) and all(
        r.headers.get("Authorization") == "Bearer front-only" for r in front.requests
    )
    followed = part_gets(served.requests)
    assert followed and all("Authorization" not in r.headers and r.headers.get("X-Trace") == "t" for r in followed)
    assert all(r.range is not None for r in followed), "the redirected GET still asks for its range"


@pytest.mark.parametrize(
    ("mode", "says"), [("shifted", "asked for bytes 0-.*the server sent bytes from 1"), ("total", "server's object is")]
)
def test_an_answer_for_another_range_or_another_object_is_refused(
    www: Path, tmp_path: Path, mode: str, says: str
) -> None:
    server = Misanswering(www, mode).start()
    try:
        with pytest.raises(sepstore.IntegrityError, match=says):
            sepstore.load(f"{server.url}/{MANIFEST}", "e", cache_dir=tmp_path)
    finally:
        server.stop()
    assert not list((tmp_path / "parts/blake3").iterdir())


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that signs itself, and its key (PEM files in ``folder``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def https_server(root: Path, folder: Path) -> tuple[StaticServer, Path]:
    """A started HTTPS server of ``root`` whose certificate signs itself, and that certificate
    (written in ``folder``)."""
    cert, key = self_signed(folder)
    server = StaticServer(root)
    server.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.tls.load_cert_chain(cert, key)
    server.start()
    return server, cert


def test_https_parts_come_only_from_a_server_whose_certificate_the_ca_store_vouches_for(
    www: Path, published: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, cert = https_server(www, tmp_path)
    monkeypatch.setattr(sepstore.retry, "BASE_DELAY", 0.01)
    try:
        url = f"{server.url}/{MANIFEST}"
        with pytest.raises(sepstore.StoreError, match="CERTIFICATE_VERIFY_FAILED") as refused:
            sepstore.load(url, cache_dir=tmp_path / "refused")
        assert "tries" not in str(refused.value) and "$SSL_CERT_FILE" in str(refused.value)  # final at once
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        psd = sepstore.load(url, cache_dir=tmp_path / "trusted")
    finally:
        server.stop()
    assert same_bytes(psd.begin["embed_tokens.weight"], published[1]["model.embed_tokens.weight"])  # type: ignore[index]
    assert part_gets(server.requests)


class Forgetful(StaticServer):
    """Answers one request per connection: the next one on it finds it dropped, unannounced (as a
    server drops kept-alive connections it deems idle)."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        port = request.transport.get_extra_info("peername")[1]
        if sum(r.port == port for r in self.requests) > 1:  # this request is recorded already
            request.transport.close()
        return await super()._handle(request)


def test_a_kept_alive_connection_the_server_has_dropped_is_replaced_without_a_failed_try(
    www: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sepstore.retry, "ATTEMPTS", 1)
    server = Forgetful(www).start()
    try:
        report = sepstore.pull(f"{server.url}/{MANIFEST}", "b e", cache_dir=tmp_path, workers=1)
    finally:
        server.stop()
    assert report.fetched == ["begin", "end"]
    answered = {r.port for r in server.requests}
    assert len(answered) >= 3 and len(server.requests) > len(answered), "reused, found dropped, replaced"


class Resolver:
    """The system's resolver as a test's DNS would make it: ``known`` names to the addresses of
    ``::1`` and ``127.0.0.1`` (in that order; the server listens on the second only), and lookups of
    ``stuck`` names that hang, as for a DNS server that never answers, until :meth:`release`."""

    def __init__(self, known: str, stuck: str) -> None:
        self.known, self.stuck = known, stuck
        self.released = threading.Event()
        self._resolve = socket.getaddrinfo

    def getaddrinfo(self, host: object, *args: Any, **kwargs: Any) -> Any:
        if host == self.stuck:
            self.released.wait()
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host == self.known:
            return [*self._resolve("::1", *args, **kwargs), *self._resolve("127.0.0.1", *args, **kwargs)]
        return self._resolve(host, *args, **kwargs)

    def release(self) -> None:
        self.released.set()


def test_a_dns_lookup_that_never_answers_fails_the_pull_after_the_timeout_naming_the_host(
    served: StaticServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = Resolver("models.sepstore.test", "stuck.sepstore.test")
    monkeypatch.setattr(socket, "getaddrinfo", resolver.getaddrinfo)
    monkeypatch.setattr(sepstore.retry, "ATTEMPTS", 2)
    monkeypatch.setattr(sepstore.retry, "BASE_DELAY", 0.01)
    monkeypatch.setenv("SEPSTORE_TIMEOUT", "0.5")
    # a name is looked up and its addresses tried in turn (::1 refuses, 127.0.0.1 serves)
    report = sepstore.pull(f"http://models.sepstore.test:{served.port}/{MANIFEST}", "b e", cache_dir=tmp_path / "a")
    assert report.fetched == ["begin", "end"]
    failures: list[BaseException] = []

    def pull() -> None:
        try:
            sepstore.pull(f"http://stuck.sepstore.test:{served.port}/{MANIFEST}", cache_dir=tmp_path / "b")
        except BaseException as exc:
            failures.append(exc)

    puller = threading.Thread(target=pull, daemon=True)
    try:
        puller.start()
        puller.join(60)
        assert not puller.is_alive(), "the pull hangs as long as the resolver does"
    finally:
        resolver.release()
    assert len(failures) == 1 and isinstance(failures[0], sepstore.StoreError)
    assert re.search(r"stuck\.sepstore\.test: its address was not found in 0\.5 s.* after 2 tries", str(failures[0]))


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_lookup_thread_that_cannot_start_fails_that_try_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def cannot_start(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", cannot_start)
        with pytest.raises(RuntimeError, match="can't start"):
            httpio._LOOKUPS.addresses("localhost", 80, 5)
    assert httpio._LOOKUPS.addresses("localhost", 80, 5), "the host is looked up again, not left waiting"


def test_a_deadline_that_runs_out_during_the_lookup_is_a_timeout_not_a_silent_resolver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resolve = socket.getaddrinfo

    def slow(*args: Any, **kwargs: Any) -> Any:
        threading.Event().wait(0.05)  # an ordinary resolver, slower than the little time left
        return resolve(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    with pytest.raises(TimeoutError) as caught:
        httpio.get(f"http://localhost:{closed_port()}/x", {}, connect_timeout=60, read_timeout=60, deadline=0.0)
    assert not isinstance(caught.value, httpio.LookupTimeoutError), caught.value


def test_a_host_none_of_whose_addresses_connects_reports_the_last_ones_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as full, socket.socket() as queued:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued.connect(full.getsockname())  # its queue is full: the next connection times out
        addresses = [full.getsockname(), ("127.0.0.1", closed_port())]  # then a server that is down
        found = [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address) for address in addresses]
        resolve = socket.getaddrinfo
        monkeypatch.setattr(
            socket, "getaddrinfo", lambda host, *a, **k: found if host == "two.test" else resolve(host, *a, **k)
        )
        with pytest.raises(ConnectionRefusedError):
            httpio.get("http://two.test/x", {}, connect_timeout=0.3, read_timeout=1, deadline=1e12)
