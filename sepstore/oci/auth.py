"""Registry credentials and authentication challenges.

Credentials for a registry host come from, in this order: those given to the client, the
environment (``$SEPSTORE_OCI_USERNAME`` and ``$SEPSTORE_OCI_PASSWORD``, for every registry), then
the Docker config that ``docker login`` writes (``$DOCKER_CONFIG/config.json``, default
``~/.docker/config.json``: ``auths[host].auth``, base64 of ``user:password``, or ``username`` and
``password``). Credential helpers (``credsStore``, ``credHelpers``) are not run: a host known only to
one is said to be so. Without credentials a registry is used anonymously.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field

from ..errors import RegistryAuthError

__all__ = ["Challenge", "Credentials", "credentials_for", "parse_challenge"]

#: Docker config files larger than this are refused before they are parsed.
_MAX_CONFIG_BYTES = 1024 * 1024
_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or token) for one registry, and where they came from (for errors)."""

    username: str
    password: str = field(repr=False)
    source: str = "given"

    def basic(self) -> str:
        """The ``Authorization`` header value of HTTP basic auth."""
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


@dataclass(frozen=True)
class Challenge:
    """A ``WWW-Authenticate`` header: its scheme (lowercase: ``basic``, ``bearer``) and parameters."""

    scheme: str
    params: dict[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    """The first challenge of a ``WWW-Authenticate`` header (``Bearer realm="...",service="...",scope="..."``)."""
    if not header or not header.strip():
        return None
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    at = 0
    while at < len(rest):
        match = _PARAM.match(rest, at)
        if match is None or match.end() == at:
            break
        quoted, bare = match.group(2), match.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        params[match.group(1).lower()] = value
        at = match.end()
    return Challenge(scheme.lower(), params)


def _docker_config_path() -> str:
    folder = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(folder, "config.json")


def _host_of(key: str) -> str:
    """A Docker config ``auths`` key (``host``, ``https://host/v1/``) reduced to its host."""
    return re.sub(r"^[a-z]+://", "", key).split("/", 1)[0].lower()


def _from_docker_config(host: str) -> Credentials | None:
    path = _docker_config_path()
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RegistryAuthError(f"{path}: cannot read the Docker config ({exc})") from exc
    if len(data) > _MAX_CONFIG_BYTES:
        raise RegistryAuthError(f"{path}: the Docker config is over {_MAX_CONFIG_BYTES} bytes; refused")
    try:
        config = json.loads(data)
    except ValueError as exc:
        raise RegistryAuthError(f"{path}: not JSON ({exc}); fix it or point $DOCKER_CONFIG elsewhere") from None
    auths = config.get("auths") if isinstance(config, dict) else None
    entry = None
    if isinstance(auths, dict):
        entry = next((v for k, v in auths.items() if isinstance(k, str) and _host_of(k) == host.lower()), None)
    if not isinstance(entry, dict) or not (entry.get("auth") or entry.get("username")):
        helpers = config.get("credHelpers") if isinstance(config, dict) else None
        # an empty auths entry beside a credsStore is how `docker login` records a helper's login
        by_store = isinstance(entry, dict) and bool(isinstance(config, dict) and config.get("credsStore"))
        if by_store or (isinstance(helpers, dict) and host in helpers):
            raise RegistryAuthError(
                f"{path}: the credentials for {host} are kept by a Docker credential helper, which sepstore "
                "does not run; set $SEPSTORE_OCI_USERNAME and $SEPSTORE_OCI_PASSWORD instead"
            )
        return None
    where = f"{path} (auths[{host!r}])"
    if entry.get("auth"):
        try:
            pair = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise RegistryAuthError(f"{where}: `auth` is not base64 of user:password") from None
        username, sep, password = pair.partition(":")
        if not sep:
            raise RegistryAuthError(f"{where}: `auth` is not base64 of user:password")
        return Credentials(username, password, where)
    return Credentials(str(entry.get("username")), str(entry.get("password", "")), where)


def credentials_for(host: str) -> Credentials | None:
    """The credentials for registry ``host`` (``host[:port]``) from the environment or the Docker
    config (see the module's docstring), or ``None`` to go anonymously."""
    username = os.environ.get("SEPSTORE_OCI_USERNAME")
    password = os.environ.get("SEPSTORE_OCI_PASSWORD")
    if username is not None or password is not None:
        if not username or password is None:
            raise RegistryAuthError(
                "set both $SEPSTORE_OCI_USERNAME and $SEPSTORE_OCI_PASSWORD (or neither, to use the Docker config)"
            )
        return Credentials(username, password, "$SEPSTORE_OCI_USERNAME/$SEPSTORE_OCI_PASSWORD")
    return _from_docker_config(host)
