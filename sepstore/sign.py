"""sign and signatures: sign a published manifest into its store, list a tag's signatures, and
carry signatures along when a model is pushed."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .errors import NotFoundError, RefError, StoreError, TrustError
from .manifest import Manifest
from .refs import MANIFEST_OPTIONS, Option, RefLike, RefOptions, Resolved, open_checked, open_ref
from .signing import Claim, PrivateKey, key_id, load_private_key, read_claim, sign_claim
from .store import MANIFESTS_DIR, Store
from .trust import TrustReport, inspect, published_as, store_of

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["SignReport", "copy_signatures", "private_key", "sign", "sign_into", "signatures"]

#: What ``sign`` reads its manifest with: no trust policy, since signing is what makes one trusted.
_SIGN_OPTIONS: Final[frozenset[Option]] = MANIFEST_OPTIONS - {"trust", "allow_rollback"}


@dataclass(frozen=True)
class SignReport:
    """A signature written: which manifest, under which name and tag, by which key, where, and when."""

    manifest_url: str
    manifest_digest: str
    name: str
    tag: str
    key_id: str
    signature_url: str
    issued_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest_url,
            "digest": self.manifest_digest,
            "name": self.name,
            "tag": self.tag,
            "key_id": self.key_id,
            "signature": self.signature_url,
            "issued_at": self.issued_at,
        }


def sign(
    ref: RefLike,
    *,
    key: str | os.PathLike[str] | PrivateKey,
    password: bytes | None = None,
    **options: Unpack[RefOptions],
) -> SignReport:
    """Sign the manifest ``ref`` names with ``key`` (a private key's PEM path, or the key), and
    store the signature in the manifest's own store as ``signatures/<name>/<tag>/<key id>.json``,
    replacing that key's earlier signature of the tag. The statement binds the manifest's digest,
    its name and tag, and the time now. ``ref`` and the options pick, pin and read the manifest as
    for :func:`sepstore.load`; ``trust`` does not apply. An encrypted key needs ``password`` (or
    ``$SEPSTORE_KEY_PASSWORD``).

    Raises:
        KeyFileError: the key cannot be used. RefError: the manifest is not published in a store.
    """
    resolved = open_ref("sign", ref, options, _SIGN_OPTIONS)
    where = published_as(resolved)
    if where is None:
        raise RefError(
            f"sign(): {resolved.url} is not published in a store under its own name "
            f"({MANIFESTS_DIR}/{resolved.manifest.name}/<tag>.json); push it into a store first"
        )
    private = private_key(key, password)
    report = sign_into(store_of(where, resolved), where.tag, resolved.manifest, resolved.digest, private)
    return dataclasses.replace(report, manifest_url=resolved.url)


def sign_into(store: Store, tag: str, manifest: Manifest, digest: str, key: PrivateKey) -> SignReport:
    """Sign the manifest ``digest`` (``manifest``, published in ``store`` under ``tag``) with ``key``,
    and store the signature there through the store's interface (a file, or a registry's referrer)."""
    claim = Claim(manifest.name, tag, digest, dt.datetime.now(dt.timezone.utc))
    kid = key_id(key)
    store.write_signature_bytes(manifest.name, tag, kid, sign_claim(key, manifest, claim))
    url = store.signature_url(manifest.name, tag, kid)
    return SignReport(store.manifest_url(manifest.name, tag), digest, manifest.name, tag, kid, url, claim.issued)


def private_key(key: str | os.PathLike[str] | PrivateKey, password: bytes | None = None) -> PrivateKey:
    """``key`` itself, or the private key in the PEM file it names (see :func:`sign`)."""
    return key if isinstance(key, PrivateKey) else load_private_key(key, password)


def signatures(ref: RefLike, **options: Unpack[RefOptions]) -> TrustReport:
    """The signatures of the manifest ``ref`` names: with a trust policy (``trust``,
    ``$SEPSTORE_TRUST``), each checked against it, and a :class:`TrustError` if none satisfies it;
    without one, each read but not verified (``valid`` is ``None``)."""
    resolved, report = open_checked("signatures", ref, options, MANIFEST_OPTIONS, report_all=True)
    return report if report is not None else inspect(resolved)


def _claim(store: Store, name: str, tag: str, kid: str) -> tuple[bytes, Claim] | None:
    """A signature's bytes and its (unverified) claim, or ``None`` when there is none or it is unreadable."""
    with contextlib.suppress(NotFoundError, TrustError):
        return read_claim(store, name, tag, kid)
    return None


def copy_signatures(src: Resolved, report: TrustReport | None, dest: Store, tag: str, digest: str) -> list[str]:
    """Copy the signatures of the manifest ``digest`` published as ``tag`` from ``src``'s store to
    ``dest``, unless ``dest`` already holds a newer one by the same key; the ids of the keys copied.

    A signature names a digest and a tag, so one for other bytes (a manifest ``push`` rewrote) or
    another tag is not copied. Key ids come from listing the source's signatures, and from the
    trust report where a backend (HTTP) cannot list."""
    where = published_as(src)
    if where is None:
        return []
    source = store_of(where, src)
    kids = {c.key_id for c in report.signatures if c.valid} if report is not None else set()
    with contextlib.suppress(StoreError):
        kids.update(source.list_signatures(where.name, where.tag))
    copied = []
    for kid in sorted(kids):
        found = _claim(source, where.name, where.tag, kid)
        if found is None or (found[1].digest, found[1].name, found[1].tag) != (digest, where.name, tag):
            continue
        held = _claim(dest, where.name, tag, kid)
        if held is not None and held[1].digest == digest and held[1].issued_at >= found[1].issued_at:
            continue
        dest.write_signature_bytes(where.name, tag, kid, found[0])
        copied.append(kid)
    return copied
