"""A real OCI registry on 127.0.0.1 for the tests: Debian's ``docker-registry`` (distribution 2.8)
as a child process, optionally with htpasswd auth, and a counting reverse proxy that can stand in
front of one and ask for bearer tokens (distribution's htpasswd mode does only basic auth).
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from aiohttp import BasicAuth, web
from servers import FaultProxy

#: Where Debian installs distribution's registry.
REGISTRY_BINARY = "/usr/bin/docker-registry"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DistributionRegistry:
    """``docker-registry serve`` on a free loopback port, its storage under ``root/data``; with
    ``user``/``password``, behind htpasswd (basic) auth."""

    def __init__(self, root: Path, *, user: str | None = None, password: str | None = None) -> None:
        self.root = root
        self.storage = root / "data"
        self.user, self.password = user, password
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> DistributionRegistry:
        binary = shutil.which("docker-registry") or REGISTRY_BINARY
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        auth = ""
        if self.user is not None:
            line = subprocess.run(
                ["htpasswd", "-Bbn", self.user, self.password or ""], check=True, capture_output=True
            ).stdout
            (self.root / "htpasswd").write_bytes(line)
            auth = f"auth:\n  htpasswd:\n    realm: sepstore-test\n    path: {self.root / 'htpasswd'}\n"
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n  secret: {secrets.token_hex(16)}\n" + auth
        )
        log = (self.root / "registry.log").open("wb")
        self._process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(self.root / 'registry.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # 401: it is up, and asks for credentials
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not start on {self.host}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps the bytes of blob ``sha256:<hex>`` (distribution's filesystem layout)."""
        hex_ = digest.removeprefix("sha256:")
        return self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hex_[:2] / hex_ / "data"


class RegistryProxy(FaultProxy):
    """A reverse proxy in front of a registry that records every request (so tests count uploads),
    keeping the ``Host`` header so that the registry's upload locations point back through it.

    With ``tokens=(user, password)`` it also plays a registry's token flow: requests without a
    valid bearer token get ``401 WWW-Authenticate: Bearer realm=<proxy>/token,service=...,scope=...``,
    and ``/token`` hands out a token for the scopes asked, to those who give that user's basic credentials."""

    methods = ("GET", "HEAD", "PUT", "POST", "PATCH", "DELETE")

    def __init__(self, upstream: str, *, tokens: tuple[str, str] | None = None) -> None:
        super().__init__(upstream)
        self.tokens = tokens
        self.issued: dict[str, set[str]] = {}  # token -> scopes it grants
        self.token_requests: list[str] = []
        self.calls: list[tuple[str, str]] = []  # (method, path with query), as the registry got them
        self.lengths: list[int] = []  # the body's declared length of each of those calls
        self.deny_mounts = False  # answer cross-repository mounts 403 DENIED, as some registries' policies do

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uploads(self, since: int = 0) -> list[str]:
        """The paths (with query) of the blob uploads started since call number ``since`` (a mount is one too)."""
        return [p for m, p in self.calls[since:] if m == "POST" and "/blobs/uploads/" in p]

    def patched_bytes(self, since: int = 0) -> int:
        """The blob bytes streamed in PATCH chunks since call number ``since`` (what a push sends of its parts)."""
        return sum(n for (m, _), n in zip(self.calls[since:], self.lengths[since:], strict=True) if m == "PATCH")

    def _needed(self, request: web.Request) -> str | None:
        parts = request.path.split("/")
        for marker in ("blobs", "manifests", "tags", "referrers"):
            if marker in parts[2:]:
                repo = "/".join(parts[2 : parts.index(marker, 2)])
                actions = "pull" if request.method in ("GET", "HEAD") else "pull,push"
                return f"repository:{repo}:{actions}"
        return None

    async def _token(self, request: web.Request) -> web.StreamResponse:
        assert self.tokens is not None
        self.token_requests.append(request.query_string)
        header = request.headers.get("Authorization", "")
        try:
            given = BasicAuth.decode(header) if header else None
        except ValueError:
            given = None
        if given is None or (given.login, given.password) != self.tokens:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}, status=401)
        token = secrets.token_hex(16)
        self.issued[token] = set(request.query.getall("scope", []))
        return web.json_response({"token": token, "expires_in": 300})

    def _authorised(self, request: web.Request, needed: str) -> bool:
        header = request.headers.get("Authorization", "")
        granted = self.issued.get(header.removeprefix("Bearer ")) if header.startswith("Bearer ") else None
        if granted is None:
            return False
        repo, actions = needed.rsplit(":", 1)
        return any(
            g.rsplit(":", 1)[0] == repo and set(actions.split(",")) <= set(g.rsplit(":", 1)[1].split(","))
            for g in granted
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.tokens is not None and request.path == "/token":
            return await self._token(request)
        needed = self._needed(request)
        guarded = self.tokens is not None and (needed is not None or request.path == "/v2/")
        if guarded and (needed is None or not self._authorised(request, needed)):
            scope = f',scope="{needed}"' if needed else ""
            challenge = f'Bearer realm="{self.url}/token",service="sepstore-test"{scope}'
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401,
                headers={"WWW-Authenticate": challenge},
            )
        self.calls.append((request.method, request.path_qs))
        if self.deny_mounts and request.method == "POST" and "mount" in request.query:
            return web.json_response({"errors": [{"code": "DENIED", "message": "mount denied"}]}, status=403)
        self.lengths.append(request.content_length or 0)
        # distribution builds its upload locations from X-Forwarded-Host: they lead back through here
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        return await super()._handle(request.clone(headers={**headers, "X-Forwarded-Host": self.host}))
