"""Keys, statements and envelopes: what a signature on a sepstore manifest is, and how it is checked.

A signature is a Sigstore bundle (``application/vnd.dev.sigstore.bundle.v0.3+json``) holding a DSSE
envelope over an in-toto Statement v1, laid out as OpenSSF model-signing's: predicate
``https://model_signing/signature/v1.0``, serialization by files with ``hash_type`` blake3, and as
resources the manifest (``manifests/<name>/<tag>.json``), every part file
(``parts/blake3/<hex>.safetensors``) and every asset file (``parts/blake3/<hex>``), paths relative
to the store root, so that
``model_signing verify key --ignore_unsigned_files`` checks a local store in place. What sepstore
relies on is the predicate's ``sepstore`` claim: the manifest's digest, the model's name and tag,
and when the signature was issued (model-signing's verifiers ignore predicate fields they do not
know).

Bundles are signed with a plain key, as model-signing's ``key`` method does (no certificate, no
transparency log): ECDSA on P-256, P-384 or P-521 (with SHA-256, -384, -512, as Sigstore pairs
them) or Ed25519. A key's id is model-signing's key hint: the SHA-256 of its public key's PEM.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Final

import msgspec
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from msgspec import Meta, Struct

from .errors import KeyFileError, TrustError
from .hashing import DIGEST_PATTERN, END, digest_hex
from .manifest import NAME_PATTERN, TAG_PATTERN, Manifest

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "BUNDLE_MEDIA_TYPE",
    "Claim",
    "PrivateKey",
    "PublicKey",
    "SignedBundle",
    "key_id",
    "keygen",
    "load_private_key",
    "load_public_key",
    "parse_issued",
    "read_claim",
    "sign_claim",
]

BUNDLE_MEDIA_TYPE: Final = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE: Final = "application/vnd.in-toto+json"
STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE: Final = "https://model_signing/signature/v1.0"
#: Where ``load_private_key`` finds the password of an encrypted key when none is passed.
PASSWORD_ENV: Final = "SEPSTORE_KEY_PASSWORD"

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
_CURVE_HASHES: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
_SUPPORTED = "ECDSA P-256, P-384 or P-521, or Ed25519"


# -- keys ------------------------------------------------------------------------------------------


def _supported(key: object) -> bool:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return key.curve.name in _CURVE_HASHES
    return isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey)


def _unsupported(key: object, source: str) -> KeyFileError:
    kind = getattr(getattr(key, "curve", None), "name", None) or type(key).__name__
    return KeyFileError(f"{source}: a {kind} key; sepstore signs with {_SUPPORTED} keys")


def _read_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1024 * 1024)
    except OSError as exc:
        raise KeyFileError(f"{what}: cannot read {os.fspath(path)!r}: {exc.strerror or exc}") from None


def load_private_key(path: str | os.PathLike[str], password: bytes | None = None) -> PrivateKey:
    """The private key in the PEM file ``path`` (PKCS#8 or OpenSSL's EC form, as ``openssl`` and
    ``sepstore keygen`` write them; an encrypted one needs ``password``, or ``$SEPSTORE_KEY_PASSWORD``)."""
    source = os.fspath(path)
    if password is None and os.environ.get(PASSWORD_ENV):
        password = os.environ[PASSWORD_ENV].encode()
    data = _read_key_file(path, "private key")
    if b"ENCRYPTED SIGSTORE PRIVATE KEY" in data or b"ENCRYPTED COSIGN PRIVATE KEY" in data:
        raise KeyFileError(
            f"{source}: a cosign-encrypted private key, which sepstore cannot read; sign with a PEM key "
            "(`sepstore keygen`, `openssl genpkey`). cosign's public keys are PEM and work in a trust policy"
        )
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError:
        what = f"is encrypted: pass its password (${PASSWORD_ENV})" if password is None else "is not encrypted"
        raise KeyFileError(f"{source}: the private key {what}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{source}: not a PEM private key sepstore can use ({exc})") from None
    if not isinstance(key, PrivateKey) or not _supported(key):
        raise _unsupported(key, source)
    return key


def load_public_key(source: str | os.PathLike[str] | bytes, *, where: str = "") -> PublicKey:
    """A public key from PEM bytes (``-----BEGIN PUBLIC KEY-----``, as openssl and cosign write
    them), or from the path of a PEM file; ``where`` names the source in errors."""
    if isinstance(source, bytes):
        data, name = source, where or "inline public key"
    else:
        data, name = _read_key_file(source, where or "public key"), where or os.fspath(source)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{name}: not a PEM public key ({exc})") from None
    if not isinstance(key, PublicKey) or not _supported(key):
        raise _unsupported(key, name)
    return key


def _public_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: PublicKey | PrivateKey) -> str:
    """A key's id: the SHA-256 (hex) of its public key's PEM, as model-signing's key hint."""
    public = key.public_key() if isinstance(key, PrivateKey) else key
    return hashlib.sha256(_public_pem(public)).hexdigest()


def keygen(path: str | os.PathLike[str], *, force: bool = False) -> str:
    """Write a new ECDSA P-256 private key to ``path`` (PEM, PKCS#8, mode 0600) and its public key
    to ``path.pub``; returns the key's id. An existing file is kept unless ``force``."""
    target = os.fspath(path)
    for out in (target, target + ".pub"):
        if not force and os.path.lexists(out):  # checked first, so that no half pair is left behind
            raise KeyFileError(f"{out} exists; pass force=True (CLI: --force) to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for out, data, mode in ((target, private, 0o600), (target + ".pub", _public_pem(key.public_key()), 0o644)):
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
        try:
            fd = os.open(out, flags, mode)
        except FileExistsError:
            raise KeyFileError(f"{out} exists; pass force=True (CLI: --force) to replace it") from None
        except OSError as exc:
            raise KeyFileError(f"cannot write {out}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # an existing file replaced with force keeps no looser mode
            f.write(data)
    return key_id(key)


# -- the statement -----------------------------------------------------------------------------------

_Name = Annotated[str, Meta(pattern=NAME_PATTERN, max_length=512)]
_Tag = Annotated[str, Meta(pattern=TAG_PATTERN, max_length=256)]
_Digest = Annotated[str, Meta(pattern=DIGEST_PATTERN)]
_Hex = Annotated[str, Meta(pattern=rf"^[0-9a-f]+{END}", max_length=256)]
_ISSUED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?Z\Z")


def parse_issued(text: str) -> dt.datetime:
    """An ``issued_at`` (RFC 3339 in UTC: ``2026-11-29T14:00:00.123456Z``) as a datetime; a
    ``ValueError`` for any other form."""
    if not _ISSUED.match(text):
        raise ValueError(f"issued_at {text!r} is not an RFC 3339 time in UTC (...Z)")
    seconds, _, fraction = text.removesuffix("Z").partition(".")
    when = dt.datetime.strptime(seconds, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc)
    return when.replace(microsecond=int(fraction.ljust(6, "0")) if fraction else 0)


class _Claim(Struct, frozen=True, forbid_unknown_fields=True):
    name: _Name
    tag: _Tag
    manifest: _Digest
    issued_at: str


class _Resource(Struct, frozen=True):
    name: str
    algorithm: str
    digest: _Hex


class _Serialization(Struct, frozen=True):
    method: str
    hash_type: str
    allow_symlinks: bool


class _Predicate(Struct, frozen=True):
    serialization: _Serialization
    resources: list[_Resource]
    sepstore: _Claim


class _Subject(Struct, frozen=True):
    name: str
    digest: dict[str, str]


class _Statement(Struct, frozen=True):
    type: str = msgspec.field(name="_type")
    subject: list[_Subject] = msgspec.field(default_factory=list)
    predicate_type: str = msgspec.field(name="predicateType", default="")
    predicate: _Predicate | None = None


@dataclass(frozen=True)
class Claim:
    """What a signature says: manifest ``digest`` is model ``name`` at ``tag``, as of ``issued_at``."""

    name: str
    tag: str
    digest: str
    issued_at: dt.datetime

    @property
    def issued(self) -> str:
        """``issued_at`` in the statement's form: RFC 3339, UTC, microseconds."""
        return self.issued_at.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _resources(manifest: Manifest, claim: Claim) -> list[_Resource]:
    """The manifest file, its parts and its assets, at their paths in a store, with their BLAKE3
    digests (sorted by path, as model-signing orders them)."""
    found = {f"manifests/{claim.name}/{claim.tag}.json": digest_hex(claim.digest)}
    for _, blob in (*manifest.labelled_parts(), *manifest.labelled_assets()):
        found[f"parts/blake3/{blob.file_name}"] = digest_hex(blob.digest)
    return [_Resource(name, "blake3", found[name]) for name in sorted(found)]


def _root_digest(resources: list[_Resource]) -> str:
    """model-signing's subject digest: SHA-256 over the resources' raw digests, in their order."""
    hasher = hashlib.sha256()
    for resource in resources:
        hasher.update(bytes.fromhex(resource.digest))
    return hasher.hexdigest()


def statement(manifest: Manifest, claim: Claim) -> bytes:
    """The in-toto statement (JSON) a signature covers."""
    resources = _resources(manifest, claim)
    return msgspec.json.encode(
        _Statement(
            type=STATEMENT_TYPE,
            subject=[_Subject(claim.name, {"sha256": _root_digest(resources)})],
            predicate_type=PREDICATE_TYPE,
            predicate=_Predicate(
                serialization=_Serialization("files", "blake3", allow_symlinks=False),
                resources=resources,
                sepstore=_Claim(claim.name, claim.tag, claim.digest, claim.issued),
            ),
        )
    )


def _claim_of(payload: bytes) -> Claim:
    """The claim of a statement, checked for the shape this module writes; a ``ValueError`` says why not."""
    try:
        decoded = msgspec.json.decode(payload, type=_Statement)
    except msgspec.ValidationError as exc:
        raise ValueError(f"statement is malformed: {exc}") from None
    except msgspec.DecodeError:
        raise ValueError("statement is not JSON") from None
    if decoded.type != STATEMENT_TYPE or decoded.predicate_type != PREDICATE_TYPE or decoded.predicate is None:
        raise ValueError(f"statement is not an in-toto v1 statement of type {PREDICATE_TYPE}")
    predicate = decoded.predicate
    claim = predicate.sepstore
    when = parse_issued(claim.issued_at)
    if any(subject.name != claim.name for subject in decoded.subject):
        raise ValueError(f"statement's subject names another model than its claim ({claim.name!r})")
    # What other tools check must say what sepstore checks: the manifest among the resources, the root digest.
    manifest_resource = _Resource(f"manifests/{claim.name}/{claim.tag}.json", "blake3", digest_hex(claim.manifest))
    roots = [s.digest.get("sha256") for s in decoded.subject]
    if manifest_resource not in predicate.resources or roots != [_root_digest(predicate.resources)]:
        raise ValueError("statement's resources or subject digest disagree with its sepstore claim")
    return Claim(claim.name, claim.tag, claim.manifest, when)


# -- the envelope ------------------------------------------------------------------------------------


class _Signature(Struct, frozen=True):
    sig: str
    keyid: str = ""


class _Envelope(Struct, frozen=True, rename="camel"):
    payload: str
    payload_type: str
    signatures: list[_Signature]


class _KeyHint(Struct, frozen=True):
    hint: str | None = None


class _Material(Struct, frozen=True, rename="camel"):
    public_key: _KeyHint | None = None
    tlog_entries: list[object] = msgspec.field(default_factory=list)


class _Bundle(Struct, frozen=True, rename="camel"):
    media_type: str
    verification_material: _Material
    dsse_envelope: _Envelope


def _pae(payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed."""
    kind = PAYLOAD_TYPE.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(_CURVE_HASHES[key.curve.name]()))


def _verify(key: PublicKey, signature: bytes, data: bytes) -> None:
    if isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(signature, data)
    else:
        key.verify(signature, data, ec.ECDSA(_CURVE_HASHES[key.curve.name]()))


def sign_claim(key: PrivateKey, manifest: Manifest, claim: Claim) -> bytes:
    """A bundle (JSON bytes) signing ``claim`` about ``manifest`` with ``key``."""
    payload = statement(manifest, claim)
    signature = _Signature(base64.b64encode(_sign(key, _pae(payload))).decode())
    bundle = _Bundle(
        media_type=BUNDLE_MEDIA_TYPE,
        verification_material=_Material(public_key=_KeyHint(key_id(key))),
        dsse_envelope=_Envelope(base64.b64encode(payload).decode(), PAYLOAD_TYPE, [signature]),
    )
    return msgspec.json.format(msgspec.json.encode(bundle), indent=2) + b"\n"


@dataclass(frozen=True)
class SignedBundle:
    """A bundle decoded but not yet verified: who it says signed it, and what."""

    source: str
    key_hint: str | None
    payload: bytes
    signature: bytes

    @classmethod
    def decode(cls, data: bytes, source: str) -> SignedBundle:
        """Decode a bundle's JSON; a :class:`TrustError` names what is malformed."""
        try:
            bundle = msgspec.json.decode(data, type=_Bundle)
            envelope = bundle.dsse_envelope
            if envelope.payload_type != PAYLOAD_TYPE or len(envelope.signatures) != 1:
                raise ValueError(f"its envelope is not one signature over {PAYLOAD_TYPE}")
            payload = base64.b64decode(envelope.payload, validate=True)
            signature = base64.b64decode(envelope.signatures[0].sig, validate=True)
        except (msgspec.DecodeError, binascii.Error, ValueError) as exc:
            raise TrustError(f"{source}: not a Sigstore bundle sepstore can read ({exc})") from None
        hint = bundle.verification_material.public_key
        return cls(source, hint.hint if hint is not None else None, payload, signature)

    def claim(self) -> Claim:
        """The claim, read without checking the signature (to show it, or to sort bundles)."""
        try:
            return _claim_of(self.payload)
        except ValueError as exc:
            raise TrustError(f"{self.source}: {exc}") from None

    def verify(self, key: PublicKey) -> Claim:
        """The claim, once the signature verifies with ``key``; a :class:`TrustError` says why not."""
        if self.key_hint not in (None, "", key_id(key)):
            raise TrustError(f"{self.source}: signed by key {self.key_hint}, not {key_id(key)}")
        try:
            _verify(key, self.signature, _pae(self.payload))
        except InvalidSignature:
            raise TrustError(f"{self.source}: the signature does not verify with key {key_id(key)}") from None
        return self.claim()


def read_claim(store: Store, name: str, tag: str, key_id: str) -> tuple[bytes, Claim]:
    """One key's signature of a tag in ``store``: its bytes and its claim, read without verifying it
    (to show, compare or copy it). A :class:`~sepstore.errors.NotFoundError` where that key has not
    signed the tag, a :class:`TrustError` where the file is not a bundle sepstore can read."""
    data = store.read_signature_bytes(name, tag, key_id)
    return data, SignedBundle.decode(data, store.signature_url(name, tag, key_id)).claim()
