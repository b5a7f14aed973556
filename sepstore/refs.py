"""References to a model version, normalised and checked in one place, and resolved into a manifest
whose bytes, digest and parts location agree.

Every function that reads a model (``load``, ``lazy_load``, ``read_manifest``, ``verify``, ``pull``,
``push``, ``plan``, ``diff``, ``files``) takes a reference (:data:`RefLike`) plus the options of
:class:`RefOptions`, and hands both to :func:`open_ref`: an option that function cannot use is an
error, and an option given with an already-resolved reference is applied (a pin is checked, a
mirror used) or refused, never ignored.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, TypedDict

from fsspec.core import split_protocol

from .backends import open_url
from .errors import IntegrityError, ManifestError, NotFoundError, RefError, StoreError
from .hashing import DIGEST_PATTERN
from .manifest import Blob, Manifest, decode_manifest, manifest_digest
from .store import MANIFESTS_DIR, Store, check_name, check_tag, read_limited
from .stores.base import Blobs, open_parts
from .trust import TrustLike, TrustReport, check, policy_from

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "FETCH_OPTIONS",
    "MANIFEST_OPTIONS",
    "PARTS_OPTIONS",
    "ModelRef",
    "Option",
    "Ref",
    "RefLike",
    "RefOptions",
    "Resolved",
    "is_manifest_url",
    "manifest_of",
    "open_checked",
    "open_ref",
    "resolve",
]

#: A manifest's path or URL, or a store root's.
Ref = str | os.PathLike[str]
_LOCAL = {None, "file", "local"}
#: References of this scheme name a model version in an OCI registry (:mod:`sepstore.oci`).
OCI_SCHEME: Final = "oci://"
_PIN = re.compile(DIGEST_PATTERN)
# Percent escapes a server may decode into a path separator or a dot segment ("%2e%2e" is ".."):
# in `parts` they would climb out of the store after the location was checked.
_PATH_ESCAPE = re.compile(r"%(?:2e|2f|5c|25)", re.IGNORECASE)


class RefOptions(TypedDict, total=False):
    """The options every function that reads a model takes, beside the reference itself.

    ``name``/``tag`` pick a manifest in a store root (left out: the only model, tag ``latest`` or
    the only tag); ``digest`` pins the manifest's own digest (``blake3:<hex>``); ``parts_url``
    reads the parts from a mirror (still verified); ``storage_options`` go to fsspec;
    ``cache_dir`` is where remote parts are kept (default ``$SEPSTORE_CACHE``). ``trust`` is a
    trust policy (a :class:`~sepstore.TrustPolicy`, or the path of a policy file or of one public
    key; default ``$SEPSTORE_TRUST``): the manifest must be signed as it requires, and a tag older
    than one this node accepted is refused unless ``allow_rollback``. ``None`` is the same as
    leaving an option out.
    """

    name: str | None
    tag: str | None
    digest: str | None
    parts_url: str | os.PathLike[str] | None
    storage_options: Mapping[str, Any] | None
    cache_dir: str | os.PathLike[str] | None
    trust: TrustLike | None
    allow_rollback: bool | None


Option = Literal["name", "tag", "digest", "parts_url", "storage_options", "cache_dir", "trust", "allow_rollback"]
#: Options that pick, pin, read and trust a manifest: what a function needing only the manifest takes.
MANIFEST_OPTIONS: Final[frozenset[Option]] = frozenset(
    {"name", "tag", "digest", "storage_options", "trust", "allow_rollback"}
)
#: ... and locate its parts.
PARTS_OPTIONS: Final[frozenset[Option]] = MANIFEST_OPTIONS | {"parts_url"}
#: ... and fetch them into a cache.
FETCH_OPTIONS: Final[frozenset[Option]] = PARTS_OPTIONS | {"cache_dir"}
# Why a function may not take an option: only these are ever left out of its `uses` (`sign` takes no policy).
_WHY_NOT: Final[dict[str, str]] = {
    "parts_url": "it reads no parts",
    "cache_dir": "it fetches no parts",
    "trust": "it is what makes a manifest trusted",
    "allow_rollback": "it is what makes a manifest trusted",
}


def is_manifest_url(url: str) -> bool:
    """Whether ``url`` names a manifest file rather than a store root."""
    return url.endswith(".json")


def _absolute(url: str) -> str:
    return os.path.abspath(url) if split_protocol(url)[0] in _LOCAL else url


@dataclass(frozen=True)
class ModelRef:
    """A reference to one model version, checked when it is made: a manifest URL or path, or a
    store root (``url``) with ``name``/``tag``; with an optional ``digest`` pin, a ``parts_url``
    mirror and the ``storage_options`` fsspec opens ``url`` with. ``url`` may be given as a path."""

    url: str
    name: str | None = None
    tag: str | None = None
    digest: str | None = None
    parts_url: str | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        url = os.fspath(self.url) if isinstance(self.url, str | os.PathLike) else None
        if not isinstance(url, str) or not url:
            raise RefError(f"a model reference is a manifest URL or path, or a store root; got {self.url!r}")
        if is_manifest_url(url) and (self.name is not None or self.tag is not None):
            raise RefError(f"{url} is a manifest; name= and tag= are for a store root")
        try:
            if self.name is not None:
                check_name(self.name)
            if self.tag is not None:
                check_tag(self.tag)
        except StoreError as exc:
            raise RefError(str(exc)) from None
        _pin(self.digest)
        object.__setattr__(self, "url", url)
        object.__setattr__(self, "parts_url", _parts_url(self.parts_url))
        object.__setattr__(self, "storage_options", _storage_options(self.storage_options))


def _pin(value: object) -> str | None:
    if value is None or (isinstance(value, str) and _PIN.fullmatch(value)):
        return value
    raise RefError(f"digest= pins a manifest's digest, blake3:<64 lowercase hex>; got {value!r}")


def _parts_url(value: object) -> str | None:
    if value is None:
        return None
    location = os.fspath(value) if isinstance(value, str | os.PathLike) else None
    if not isinstance(location, str) or not location.strip("/"):
        raise RefError(f"parts_url= is a path or URL of a parts folder, got {value!r}")
    return location.rstrip("/")


def _storage_options(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RefError(f"storage_options= is a mapping of fsspec options, got {value!r}")
    return dict(value)


@dataclass(frozen=True, init=False)
class Resolved:
    """A manifest read and checked: its bytes, and the digest and manifest derived from them (so
    the three cannot disagree), with the URL it was read from and where its parts live.

    ``Resolved(data, url)`` decodes ``data`` and finds the parts from the manifest's own
    ``parts`` (checked to stay inside the store); ``parts_url`` names a mirror instead. Its parts
    are read through :attr:`parts` (``parts=`` gives the store that is already open there, such as
    the one the manifest was read from).
    """

    data: bytes = field(repr=False)
    url: str
    parts_url: str
    storage_options: Mapping[str, Any] = field(hash=False)
    manifest: Manifest = field(init=False, repr=False, compare=False, hash=False)
    digest: str = field(init=False, compare=False)

    def __init__(
        self,
        data: bytes,
        url: str,
        parts_url: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        *,
        parts: Blobs | None = None,
    ) -> None:
        data, url = bytes(data), _absolute(url)
        manifest = decode_manifest(data, source=url)
        location = _parts_url(parts_url)
        if location is None:
            location = _parts_location(url, manifest)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "url", url)
        object.__setattr__(self, "parts_url", location)
        object.__setattr__(self, "storage_options", _storage_options(storage_options))
        object.__setattr__(self, "manifest", manifest)
        object.__setattr__(self, "digest", manifest_digest(data))
        # not a field: a copy with another parts_url (dataclasses.replace) opens its own
        object.__setattr__(self, "_parts", parts if parts is not None and parts.parts_url == location else None)

    @property
    def parts(self) -> Blobs:
        """Where the parts and assets are read (:class:`~sepstore.stores.base.Blobs`): the store given,
        else opened at ``parts_url`` when first asked for (a registry repository, or a folder of part files)."""
        parts: Blobs | None = self.__dict__["_parts"]
        if parts is None:
            parts = open_parts(self.parts_url, self.storage_options)
            object.__setattr__(self, "_parts", parts)
        return parts

    @property
    def tag(self) -> str:
        """The tag the manifest is published under: its file name without ``.json`` (the tag of an
        ``oci://HOST/REPOSITORY:TAG`` reference; empty for one pinned by image digest alone)."""
        if self.url.startswith(OCI_SCHEME):
            name = self.url.rsplit("/", 1)[-1].partition("@")[0]
            return name.rpartition(":")[2] if ":" in name else ""
        return posixpath.basename(self.url).removesuffix(".json")

    def part_url(self, part: Blob) -> str:
        """The URL of a part's (or an asset's) file (in an OCI registry: its blob's URL there)."""
        return self.parts.blob_url(part)


#: What every function that reads a model takes as its reference.
RefLike = Ref | ModelRef | Resolved


def resolve(ref: RefLike, **options: Unpack[RefOptions]) -> Resolved:
    """Read the manifest ``ref`` names and check it (and its digest, when ``digest`` pins one).

    ``ref`` is a manifest's path or URL (``.../manifests/llama/v2.json``), a store root, an OCI
    reference (``oci://HOST/REPOSITORY:TAG``, see :mod:`sepstore.oci`), a :class:`ModelRef`, or a
    :class:`Resolved` (returned as is, or with ``parts_url`` applied and ``digest`` checked). See
    :class:`RefOptions` for the options; ``cache_dir`` does not apply.

    Raises:
        RefError: a malformed option, or one that cannot apply to ``ref``.
        NotFoundError: no manifest there. IntegrityError: the pinned digest differs.
        ManifestError: the manifest does not decode, or its parts lie outside its store.
    """
    return open_ref("resolve", ref, options, PARTS_OPTIONS)


def open_ref(caller: str, ref: RefLike, options: Mapping[str, object], uses: frozenset[Option]) -> Resolved:
    """What every public function does with its reference: refuse options ``caller`` cannot use
    (all but ``uses``), merge the rest into ``ref``, resolve it, and enforce the trust policy
    (``trust``, else ``$SEPSTORE_TRUST``, when ``caller`` takes one). ``cache_dir`` is left to the
    caller, which reads it from ``options``."""
    return open_checked(caller, ref, options, uses)[0]


def open_checked(
    caller: str, ref: RefLike, options: Mapping[str, object], uses: frozenset[Option], *, report_all: bool = False
) -> tuple[Resolved, TrustReport | None]:
    """:func:`open_ref`, and the report of the trust policy enforced (``None`` without one);
    ``report_all`` lists signatures by keys outside the policy too."""
    given = _given(caller, options, uses)
    cache_dir = given.pop("cache_dir", None)
    policy = policy_from(given.pop("trust", None), environment="trust" in uses)
    allow_rollback = bool(given.pop("allow_rollback", False))
    if allow_rollback and policy is None:
        raise RefError(f"{caller}(): allow_rollback= applies only with a trust policy (trust=, $SEPSTORE_TRUST)")
    if isinstance(ref, Resolved):
        resolved = _apply(caller, ref, given)
    elif isinstance(ref, ModelRef):
        resolved = _read(_merge(caller, ref, given))
    elif isinstance(ref, str | os.PathLike):
        resolved = _read(ModelRef(os.fspath(ref), **given))
    else:
        raise RefError(
            f"{caller}(): a model reference is a manifest URL or path, a store root, a ModelRef or a Resolved; "
            f"got {ref!r}"
        )
    if policy is None:
        return resolved, None
    try:
        own_parts: str | None = _parts_location(resolved.url, resolved.manifest)
    except ManifestError:  # the caller's mirror is read instead, but the manifest's own location is refused
        own_parts = None
    report = check(
        resolved, policy, own_parts, allow_rollback=allow_rollback, cache_dir=cache_dir, report_all=report_all
    )
    return resolved, report


def manifest_of(caller: str, ref: RefLike | Manifest, options: Mapping[str, object]) -> Manifest:
    """The manifest of a reference, or ``ref`` itself when it is one (then no option applies)."""
    if isinstance(ref, Manifest):
        for key in _given(caller, options, MANIFEST_OPTIONS):
            raise RefError(f"{caller}(): {key}= cannot apply to a Manifest object, which is already read")
        return ref
    return open_ref(caller, ref, options, MANIFEST_OPTIONS).manifest


def _given(caller: str, options: Mapping[str, object], uses: frozenset[Option]) -> dict[str, Any]:
    """The options given (not ``None``), once each is known and one ``caller`` uses."""
    known = RefOptions.__optional_keys__
    for key in options:
        if key not in known:
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}")
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in uses:
            raise RefError(f"{caller}() does not take {key}=: {_WHY_NOT[key]}")
    return given


def _apply(caller: str, resolved: Resolved, given: dict[str, Any]) -> Resolved:
    """Options given with an already-resolved reference: a pin is checked, a mirror applied, and
    what would pick or read another manifest is refused."""
    for key in ("name", "tag", "storage_options"):
        if key in given:
            raise RefError(
                f"{caller}(): {key}= cannot apply to an already-resolved reference ({resolved.url}); "
                "pass it to resolve() instead"
            )
    if "digest" in given:
        _check_pin(resolved.url, resolved.digest, _pin(given["digest"]))
    if "parts_url" in given:
        return dataclasses.replace(resolved, parts_url=given["parts_url"])
    return resolved


def _merge(caller: str, ref: ModelRef, given: dict[str, Any]) -> ModelRef:
    """``ref`` with the options it leaves open filled in; one that contradicts it is refused."""
    merged = dataclasses.replace(ref, **given)
    for key in given:
        held, value = getattr(ref, key), getattr(merged, key)
        if held and held != value:
            raise RefError(f"{caller}(): {key}={value!r} contradicts the reference's {key}={held!r}")
    return merged


def _check_pin(url: str, got: str, pinned: str | None) -> None:
    if pinned is not None and got != pinned:
        raise IntegrityError(f"{url}: manifest digest is {got}, but {pinned} was pinned")


def _read(ref: ModelRef) -> Resolved:
    """Read the manifest a checked reference names, pin first, then decode it."""
    if ref.url.startswith(OCI_SCHEME):
        resolved = _read_oci(ref)
        _check_pin(resolved.url, resolved.digest, ref.digest)
        return resolved
    store: Store | None = None  # where the manifest is read, and so its parts (unless it names others)
    if is_manifest_url(ref.url):
        fs, path = open_url(ref.url, ref.storage_options)
        manifest_url = _absolute(ref.url)
        data = read_limited(fs, path, manifest_url)
    else:
        store = Store(ref.url, dict(ref.storage_options))
        name, tag = _pick(store, ref.name, ref.tag)
        manifest_url = store.url_of(store.manifest_path(name, tag))
        data = store.read_manifest_bytes(name, tag)
    _check_pin(manifest_url, manifest_digest(data), ref.digest)
    return Resolved(data, manifest_url, ref.parts_url, ref.storage_options, parts=store)


def _read_oci(ref: ModelRef) -> Resolved:
    """An ``oci://HOST/REPOSITORY[:TAG]`` reference, read from its registry (imported only for one)."""
    from .oci.layout import resolve_url

    if ref.name is not None:
        raise RefError(f"{ref.url}: an OCI repository holds one model; name= is for a store root")
    return resolve_url(ref.url, tag=ref.tag, parts_url=ref.parts_url, storage_options=ref.storage_options)


def _pick(store: Store, name: str | None, tag: str | None) -> tuple[str, str]:
    if name is not None and tag is not None:
        return name, tag
    if name is not None and not store.can_list:
        return name, "latest"  # what a listing would pick for one model with a `latest` tag
    found = store.list_manifests()
    candidates = [(n, t) for n, t in found if name in (None, n) and tag in (None, t)]
    if len(candidates) > 1 and len({n for n, _ in candidates}) == 1:
        latest = [(n, t) for n, t in candidates if t == "latest"]
        candidates = latest or candidates
    if len(candidates) == 1:
        return candidates[0]
    what = f"model {name!r}" if name is not None else "models"
    if not candidates:
        _require(store)
        where = f"{store.url}/{MANIFESTS_DIR}"
        raise NotFoundError(f"no {what}{f' with tag {tag!r}' if tag else ''} in store {store.url} (looked in {where})")
    listing = ", ".join(f"{n}:{t}" for n, t in candidates)
    if len({n for n, _ in candidates}) == 1:
        raise NotFoundError(
            f"model {candidates[0][0]!r} in store {store.url} has no 'latest' tag but several others ({listing}); "
            "pick one with tag= (--tag)"
        )
    raise NotFoundError(f"store {store.url} holds several models ({listing}); pick one with name= (--name) and tag=")


def _require(store: Store) -> None:
    """A store root with no manifests must at least exist; one that looks like a mistyped manifest
    URL (``.../v1.jsn``, or anything under ``manifests/``) is said to be one."""
    base = posixpath.basename(store.url)
    mistyped = posixpath.splitext(base)[1] != "" or f"/{MANIFESTS_DIR}/" in store.url
    if not mistyped:
        store.require()
        return
    try:
        store.require()
    except NotFoundError:
        raise NotFoundError(
            f"{store.url}: nothing there; a manifest URL ends in .json (.../{MANIFESTS_DIR}/<name>/<tag>.json), "
            f"a store root is the folder holding {MANIFESTS_DIR}/ and parts/"
        ) from None
    raise NotFoundError(
        f"{store.url} is neither a manifest (a manifest URL ends in .json) nor a store root "
        f"(no {MANIFESTS_DIR}/ folder with manifests in it)"
    )


def _parts_location(manifest_url: str, manifest: Manifest) -> str:
    """Where a manifest's parts live, refusing locations outside its store or of another protocol."""
    protocol, path = split_protocol(manifest_url)
    parts = manifest.parts
    if _PATH_ESCAPE.search(parts):
        raise ManifestError(
            f"{manifest_url}: field `parts` {parts!r} has a percent escape of '.', '/', '\\' or '%', which a "
            "server would decode after the location was checked; refused"
        )
    parts_protocol = split_protocol(parts)[0]
    local = protocol in _LOCAL
    if parts_protocol is not None or parts.startswith("/"):
        same = (parts_protocol in _LOCAL) if local else parts_protocol == protocol
        if not same:
            raise ManifestError(
                f"{manifest_url}: field `parts` {parts!r} uses another protocol than the manifest; refused "
                "(pass parts_url= to read parts from a mirror you trust)"
            )
        return parts.rstrip("/")
    folder = posixpath.dirname(path)
    joined = posixpath.normpath(posixpath.join(folder, parts))
    # The store root is above the manifests/ folder; a manifest outside one only reaches below itself.
    own = f"/{MANIFESTS_DIR}/{manifest.name}"
    cut = len(folder) - len(own) if folder.endswith(own) else (folder + "/").rfind(f"/{MANIFESTS_DIR}/")
    root = (folder[:cut] or "/") if cut >= 0 else folder
    inside = joined == root or joined.startswith(root.rstrip("/") + "/")
    if not inside:
        raise ManifestError(f"{manifest_url}: field `parts` {parts!r} points outside the store; refused")
    return joined if local else f"{protocol}://{joined}"
