"""Trust policies: which keys may sign which model names, enforced before a manifest is used; and
the rollback state a node keeps in its cache folder.

A policy is a JSON file ``{"keys": [{"public_key": "<path or inline PEM>", "names": ["acme/*"]}]}``
(a relative path is relative to the policy file; unknown fields are refused, so that a policy
written for a newer sepstore never silently means less), or the path of one public key's PEM,
trusted for every name. With a policy in force a manifest is used only if it is published where
its own name says, its parts stay in its store, and a signature by a key allowed for its name
verifies and names its digest, name and tag; the newest issue time a node accepted for a store,
name and tag is kept under ``<cache>/trust/``, and an older one is refused.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgspec
from msgspec import Struct

from .cache import default_cache_dir
from .errors import KeyFileError, NotFoundError, RefError, StoreError, TrustError
from .signing import PublicKey, SignedBundle, key_id, load_public_key, parse_issued, read_claim
from .store import MANIFESTS_DIR, Store, backend_errors, file_lock, fsync_dir, make_dirs, staged

if TYPE_CHECKING:
    from .refs import Resolved

__all__ = [
    "TRUST_ENV",
    "Published",
    "SignatureCheck",
    "TrustLike",
    "TrustPolicy",
    "TrustReport",
    "TrustedKey",
    "check",
    "inspect",
    "policy_from",
    "published_as",
    "store_of",
]

#: The environment variable naming the policy every read enforces when ``trust=`` is not given.
TRUST_ENV: Final = "SEPSTORE_TRUST"
_MAX_POLICY_BYTES: Final = 1024 * 1024


@dataclass(frozen=True)
class TrustedKey:
    """A public key and the model names (glob patterns; ``*`` also matches ``/``) it may sign."""

    key: PublicKey
    names: tuple[str, ...]

    @property
    def key_id(self) -> str:
        return key_id(self.key)

    def allows(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names)


@dataclass(frozen=True)
class TrustPolicy:
    """The keys a node trusts, each for some model names; ``source`` names where it was read."""

    keys: tuple[TrustedKey, ...]
    source: str = "policy"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrustPolicy:
        """A policy file (JSON), or one public key (PEM) trusted for every name."""
        source = os.fspath(path)
        try:
            with open(source, "rb") as f:
                data = f.read(_MAX_POLICY_BYTES + 1)
        except OSError as exc:
            raise KeyFileError(f"cannot read trust policy {source!r}: {exc.strerror or exc}") from None
        if b"-----BEGIN" in data and not data.lstrip().startswith(b"{"):
            return cls((TrustedKey(load_public_key(data, where=source), ("*",)),), source)
        if len(data) > _MAX_POLICY_BYTES:
            raise KeyFileError(f"{source}: larger than {_MAX_POLICY_BYTES} bytes; not a trust policy")
        try:
            decoded = msgspec.json.decode(data, type=_PolicyFile)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise KeyFileError(
                f'{source}: not a trust policy ({exc}); write {{"keys": [{{"public_key": "key.pub", '
                '"names": ["acme/*"]}]}, or give the path of one public key'
            ) from None
        folder = os.path.dirname(os.path.abspath(source))
        keys = []
        for n, entry in enumerate(decoded.keys):
            where = f"{source}: keys[{n}].public_key"
            pem = entry.public_key.strip()
            if pem.startswith("-----BEGIN"):
                key = load_public_key(pem.encode(), where=where)
            else:
                key = load_public_key(os.path.join(folder, os.path.expanduser(entry.public_key)), where=where)
            keys.append(TrustedKey(key, tuple(entry.names)))
        return cls(tuple(keys), source)


class _KeyEntry(Struct, frozen=True, forbid_unknown_fields=True):
    public_key: str
    names: list[str]


class _PolicyFile(Struct, frozen=True, forbid_unknown_fields=True):
    keys: list[_KeyEntry]


#: What ``trust=`` takes: a policy, or the path of a policy file or of one public key.
TrustLike = TrustPolicy | str | os.PathLike[str]


def policy_from(value: object, *, environment: bool) -> TrustPolicy | None:
    """The policy ``value`` names; when it is ``None`` and ``environment``, ``$SEPSTORE_TRUST``'s."""
    if value is None and environment:
        value = os.environ.get(TRUST_ENV) or None
    if value is None or isinstance(value, TrustPolicy):
        return value
    if isinstance(value, str | os.PathLike) and os.fspath(value):
        return TrustPolicy.load(value)
    raise RefError(f"trust= is a TrustPolicy, or the path of a policy file or of a public key; got {value!r}")


@dataclass(frozen=True)
class SignatureCheck:
    """One signature of a tag: its key, when it was issued, and whether it satisfies the policy
    (``valid`` is ``None`` when no policy was given to check it against)."""

    key_id: str
    url: str
    issued_at: str | None
    valid: bool | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "url": self.url,
            "issued_at": self.issued_at,
            "valid": self.valid,
            "error": self.error,
        }


@dataclass(frozen=True)
class TrustReport:
    """The signatures of a manifest, and, with a policy, whether it is satisfied (and by what)."""

    manifest_url: str
    manifest_digest: str
    signatures: list[SignatureCheck]
    policy: str | None = None
    satisfied: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "satisfied": self.satisfied,
            "signatures": [s.to_dict() for s in self.signatures],
        }


@dataclass(frozen=True)
class Published:
    """A manifest's place in its store: the store root and the name and tag it is published as."""

    root: str
    name: str
    tag: str


def published_as(resolved: Resolved) -> Published | None:
    """Where a manifest is published, if at ``<root>/manifests/<its own name>/<tag>.json``."""
    from .refs import OCI_SCHEME  # refs imports this module

    name, tag = resolved.manifest.name, resolved.tag
    if resolved.url.startswith(OCI_SCHEME):  # oci://HOST/REPOSITORY:TAG: the repository is its store
        return Published(resolved.url.partition("@")[0].removesuffix(f":{tag}"), name, tag) if tag else None
    suffix = f"/{MANIFESTS_DIR}/{name}/{tag}.json"
    if not resolved.url.endswith(suffix):
        return None
    return Published(resolved.url[: -len(suffix)] or "/", name, tag)


def store_of(where: Published, resolved: Resolved) -> Store:
    """Where the manifest's signatures are: its store, or for a registry, its image's referrers."""
    from .refs import OCI_SCHEME

    if where.root.startswith(OCI_SCHEME):
        from .stores.registry import RegistryStore

        return RegistryStore.of_resolved(resolved)
    return Store(where.root, dict(resolved.storage_options))


def _check_one(
    store: Store, where: Published, resolved: Resolved, entries: list[TrustedKey], bundle: bytes
) -> SignatureCheck:
    """Check one signature against a trusted key (listed in ``entries``, each with names it may
    sign) and the manifest; never raises for a bad one."""
    trusted = entries[0]
    url = store.signature_url(where.name, where.tag, trusted.key_id)
    issued = None
    try:
        signed = SignedBundle.decode(bundle, url)
        claim = signed.verify(trusted.key)
        issued = claim.issued
        if claim.digest != resolved.digest:
            raise TrustError(
                f"signs manifest {claim.digest}, not this one ({resolved.digest}): the manifest changed after signing"
            )
        if claim.name != where.name:
            raise TrustError(f"signs model {claim.name!r}, not {where.name!r}")
        if claim.tag != where.tag:
            raise TrustError(f"signs tag {claim.tag!r}, not {where.tag!r}")
        if not any(entry.allows(where.name) for entry in entries):
            names = [name for entry in entries for name in entry.names]
            raise TrustError(f"the policy allows this key to sign only {names}, not {where.name!r}")
    except TrustError as exc:
        reason = str(exc).removeprefix(f"{url}: ")
        return SignatureCheck(trusted.key_id, url, issued, False, reason)
    return SignatureCheck(trusted.key_id, url, issued, True)


def _others(store: Store, where: Published, known: set[str]) -> list[SignatureCheck]:
    """Signatures by keys the policy does not name (for reports; a backend that cannot list has none)."""
    with contextlib.suppress(StoreError):
        found = store.list_signatures(where.name, where.tag)
        return [
            SignatureCheck(k, store.signature_url(where.name, where.tag, k), None, False, "key not in the policy")
            for k in found
            if k not in known
        ]
    return []


def check(
    resolved: Resolved,
    policy: TrustPolicy,
    own_parts: str | None,
    *,
    allow_rollback: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    report_all: bool = False,
) -> TrustReport:
    """Enforce ``policy`` on a resolved manifest whose own ``parts`` location is ``own_parts``
    (``None``: one the manifest cannot have), and record its issue time in the cache's rollback
    state. ``report_all`` also lists signatures by keys the policy does not name.

    Raises:
        TrustError: the rule that failed, and what to do.
    """
    url, manifest = resolved.url, resolved.manifest
    where = published_as(resolved)
    if where is None:
        raise TrustError(
            f"{url}: the manifest names itself {manifest.name!r}, but is not published as "
            f"{MANIFESTS_DIR}/{manifest.name}/<tag>.json in a store, so no signature can vouch for it there; "
            "load it by its store's URL"
        )
    if resolved.parts_url == own_parts and (own_parts is None or not _inside(own_parts, where.root)):
        raise TrustError(
            f"{url}: field `parts` {manifest.parts!r} leads outside the store {where.root}; "
            "a trusted manifest keeps its parts in its store (pass parts_url= to read from a mirror you chose)"
        )
    store = store_of(where, resolved)
    by_id: dict[str, list[TrustedKey]] = {}
    for trusted in policy.keys:  # a key may be listed more than once, with other names
        by_id.setdefault(trusted.key_id, []).append(trusted)
    checks: list[SignatureCheck] = []
    for kid, entries in by_id.items():
        try:
            bundle = store.read_signature_bytes(where.name, where.tag, kid)
        except NotFoundError:
            continue
        checks.append(_check_one(store, where, resolved, entries, bundle))
    if report_all:
        checks += _others(store, where, {c.key_id for c in checks})
    valid = [c for c in checks if c.valid]
    if not valid:
        why = "; ".join(f"{c.url}: {c.error}" for c in checks if c.error != "key not in the policy")
        folder = store.signatures_url(where.name, where.tag)
        raise TrustError(
            f"{url}: no valid signature by a key that {policy.source} trusts for {where.name!r}"
            + (f" ({why})" if why else f" in {folder}")
            + f"; sign it with `sepstore sign {url} --key KEY` using a trusted key, or check the policy"
        )
    newest = max((c.issued_at for c in valid if c.issued_at is not None), key=parse_issued)
    _Rollback(cache_dir).advance(where, newest, resolved.digest, allow_rollback)
    return TrustReport(url, resolved.digest, checks, policy.source, True)


def _inside(location: str, root: str) -> bool:
    return location == root or location.startswith(root.rstrip("/") + "/")


def inspect(resolved: Resolved) -> TrustReport:
    """The signatures of a manifest's tag, read but not verified (no policy names a key to check
    them with): for ``info`` and ``verify`` without ``trust``."""
    where = published_as(resolved)
    if where is None:
        return TrustReport(resolved.url, resolved.digest, [])
    store = store_of(where, resolved)
    checks = []
    for found in _others(store, where, set()):
        try:
            claim = read_claim(store, where.name, where.tag, found.key_id)[1]
        except (TrustError, NotFoundError) as exc:
            checks.append(SignatureCheck(found.key_id, found.url, None, None, str(exc).removeprefix(f"{found.url}: ")))
            continue
        mismatch = None if claim.digest == resolved.digest else f"signs another manifest ({claim.digest})"
        checks.append(SignatureCheck(found.key_id, found.url, claim.issued, None, mismatch))
    return TrustReport(resolved.url, resolved.digest, checks)


class _Rollback:
    """The newest issue time a node has accepted per store, name and tag, one small JSON file each
    under ``<cache>/trust/<store hash>/<name>/<tag>.json``, updated under a lock so it only moves forward."""

    def __init__(self, cache_dir: str | os.PathLike[str] | None) -> None:
        self.root = os.path.join(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir(), "trust")

    def _path(self, where: Published) -> str:
        store = hashlib.sha256(where.root.encode()).hexdigest()[:32]
        return os.path.join(self.root, store, *where.name.split("/"), f"{where.tag}.json")

    def advance(self, where: Published, issued_at: str, digest: str, allow_rollback: bool) -> None:
        """Accept ``issued_at`` for a tag: refuse it if older than the newest accepted (unless
        ``allow_rollback``), and remember it if newer."""
        path = self._path(where)
        # a cache this user cannot write, a full disk: a StoreError naming the folder, not a raw OSError
        where_state = f"rollback state in {self.root}"
        with backend_errors(where_state):
            make_dirs(os.path.dirname(path))
        with backend_errors(where_state), file_lock(path + ".lock"):
            seen = self._read(path)
            if seen is not None:
                accepted, now = parse_issued(seen["issued_at"]), parse_issued(issued_at)
                if now < accepted and not allow_rollback:
                    raise TrustError(
                        f"{where.root}/{MANIFESTS_DIR}/{where.name}/{where.tag}.json: signed at {issued_at}, but this "
                        f"node already accepted a version signed at {seen['issued_at']} ({seen['digest']}); "
                        "refusing a rollback (pass allow_rollback=True / --allow-rollback to accept it on purpose)"
                    )
                if now <= accepted:
                    return
            record = {
                "store": where.root,
                "name": where.name,
                "tag": where.tag,
                "issued_at": issued_at,
                "digest": digest,
            }
            with staged(path, json.dumps(record).encode()) as tmp:
                os.replace(tmp, path)
                fsync_dir(os.path.dirname(path))

    @staticmethod
    def _read(path: str) -> Mapping[str, str] | None:
        try:
            with open(path) as f:
                seen = json.load(f)
            parse_issued(seen["issued_at"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            raise TrustError(
                f"rollback state {path} is unreadable; delete it to forget what this node accepted"
            ) from None
        return seen
