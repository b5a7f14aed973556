"""A sepstore model in an OCI registry, in ModelPack's form.

A repository holds one model, its tags the model's versions (as with ``docker push``):
``oci://HOST[:PORT]/REPOSITORY:TAG`` names one. Its image manifest has artifact type
``application/vnd.cncf.model.manifest.v1+json`` and a ModelPack model config; its layers are

- one ``application/vnd.cncf.model.weight.v1.raw`` layer per part file (parts of equal bytes share
  one), annotated with the part's label (``org.sepstore.part``: ``begin``, ``mid.3``, ``end``) and
  BLAKE3 digest (``org.sepstore.digest``);
- one layer per asset (``...doc.v1.raw`` for READMEs and licenses, else ``...weight.config.v1.raw``),
  annotated with its path (``org.sepstore.asset``) and BLAKE3 digest;
- the sepstore manifest itself, byte for byte (so its BLAKE3 digest and its signatures hold), as a
  ``...weight.config.v1.raw`` layer annotated ``org.sepstore.manifest: <its BLAKE3 digest>``.

Every layer's title (``org.opencontainers.image.title``, and ModelPack's ``org.cncf.model.filepath``)
is its path in a sepstore store (``parts/blake3/<hex>.safetensors``, ``manifests/<name>/<tag>.json``),
so ``oras pull`` of a model writes a store that sepstore loads as it is. The registry addresses blobs
by SHA-256; a reader checks the SHA-256 of what it reads whole, and the BLAKE3 the sepstore manifest
promises of every part and asset. Signatures are OCI referrers of the image manifest
(:mod:`sepstore.oci.signatures`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import IntegrityError, ManifestError, NotFoundError, RefError, SepstoreError, StoreError
from ..hashing import Hasher, digest_buffer, digest_of
from ..manifest import MAX_MANIFEST_BYTES, Blob, Manifest, decode_manifest
from ..refs import Resolved
from ..store import MANIFESTS_DIR, PARTS_DIR, check_tag
from ..tags import TagInfo
from .auth import Credentials
from .client import OCI_MANIFEST, Registry

__all__ = [
    "MODEL_ARTIFACT",
    "OciModel",
    "OciRef",
    "registry_for",
    "resolve_oci",
    "resolve_url",
    "tags_oci",
]

MODEL_ARTIFACT: Final = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG: Final = "application/vnd.cncf.model.config.v1+json"
WEIGHT_RAW: Final = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG_RAW: Final = "application/vnd.cncf.model.weight.config.v1.raw"
DOC_RAW: Final = "application/vnd.cncf.model.doc.v1.raw"
TITLE: Final = "org.opencontainers.image.title"
FILEPATH: Final = "org.cncf.model.filepath"
PART: Final = "org.sepstore.part"
ASSET: Final = "org.sepstore.asset"
DIGEST: Final = "org.sepstore.digest"
MANIFEST: Final = "org.sepstore.manifest"
_WORKERS = 8

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
_OCI_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_PIN = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_DOC = re.compile(r"(?:^|/)(?:readme|license|licence|notice|copying)[^/]*$|\.md$", re.IGNORECASE)


@dataclass(frozen=True)
class OciRef:
    """``oci://HOST[:PORT]/REPOSITORY[:TAG][@sha256:<hex>]``, checked when it is made."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, url: str) -> OciRef:
        if not isinstance(url, str) or not url.startswith("oci://"):
            raise RefError(f"an OCI reference is oci://HOST[:PORT]/REPOSITORY[:TAG]; got {url!r}")
        rest = url[len("oci://") :]
        host, slash, path = rest.partition("/")
        if not slash or not host or not path:
            raise RefError(f"{url}: an OCI reference is oci://HOST[:PORT]/REPOSITORY[:TAG]")
        path, _, pin = path.partition("@")
        last = path.rsplit("/", 1)[-1]
        tag = None
        if ":" in last:
            path, _, tag = path.rpartition(":")
        return cls(host, path, tag, pin or None)

    def __post_init__(self) -> None:
        where = f"oci://{self.host}/{self.repository}"
        if not _REPOSITORY.fullmatch(self.repository) or len(self.repository) > 255:
            raise RefError(
                f"{where}: a repository is lowercase letters and digits, in '/'-separated components joined by "
                "'.', '_', '__' or '-' (e.g. models/llama-3-8b)"
            )
        if self.tag is not None:
            if not _OCI_TAG.fullmatch(self.tag):
                raise RefError(f"{where}: tag {self.tag!r} is not an OCI tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})")
            try:
                check_tag(self.tag)
            except StoreError as exc:
                raise RefError(str(exc)) from None
        if self.digest is not None and not _PIN.fullmatch(self.digest):
            raise RefError(f"{where}: a pinned image digest is sha256:<64 lowercase hex>, got {self.digest!r}")

    @property
    def url(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        pin = f"@{self.digest}" if self.digest else ""
        return f"oci://{self.host}/{self.repository}{tag}{pin}"

    @property
    def reference(self) -> str:
        """What the registry is asked for: the pinned digest, else the tag."""
        if self.digest is not None:
            return self.digest
        if self.tag is None:
            raise RefError(f"{self.url}: name a tag (oci://HOST/REPOSITORY:TAG) or pin a digest (@sha256:...)")
        return self.tag

    def with_tag(self, tag: str) -> OciRef:
        return OciRef(self.host, self.repository, tag)


def _file_path(blob: Blob) -> str:
    return f"{PARTS_DIR}/{blob.file_name}"


def _media_type(path: str) -> str:
    return DOC_RAW if _DOC.search(path) else WEIGHT_CONFIG_RAW


@dataclass
class _Layer:
    """One layer to publish: its blob's local file (or bytes), SHA-256, size and annotations."""

    media_type: str
    annotations: dict[str, str]
    size: int
    source: str | bytes
    sha256: str = ""
    labels: list[str] = field(default_factory=list)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.sha256, "size": self.size, "annotations": self.annotations}


def _layers(manifest: Manifest, data: bytes, tag: str, blob_source: Callable[[Blob], str]) -> list[_Layer]:
    """The layers of a model, parts in label order, then assets by path, then the manifest."""
    layers: dict[str, _Layer] = {}
    for label, part in manifest.labelled_parts():
        held = layers.get(part.file_name)
        if held is not None:
            held.labels.append(label)
            held.annotations[PART] = ",".join(held.labels)
            continue
        path = _file_path(part)
        notes = {TITLE: path, FILEPATH: path, PART: label, DIGEST: part.digest}
        layers[part.file_name] = _Layer(WEIGHT_RAW, notes, part.size, blob_source(part), labels=[label])
    for path, asset in sorted(manifest.asset_files.items()):
        if asset.file_name in layers:
            continue  # the same bytes as a part or an earlier asset: one blob, listed once
        file = _file_path(asset)
        notes = {TITLE: file, FILEPATH: file, ASSET: path, DIGEST: asset.digest}
        layers[asset.file_name] = _Layer(_media_type(path), notes, asset.size, blob_source(asset), labels=[path])
    own = f"{MANIFESTS_DIR}/{manifest.name}/{tag}.json"
    notes = {TITLE: own, FILEPATH: own, MANIFEST: digest_buffer(data)}
    return [*layers.values(), _Layer(WEIGHT_CONFIG_RAW, notes, len(data), data, labels=["manifest"])]


def _model_config(manifest: Manifest, layers: list[_Layer]) -> bytes:
    """ModelPack's model config (``application/vnd.cncf.model.config.v1+json``); no time or tag in
    it, so the same model pushed twice, under any tag, has the same config blob."""
    descriptor: dict[str, Any] = {"name": manifest.name}
    config: dict[str, Any] = {"format": "safetensors"}
    hf = manifest.config or {}
    if isinstance(hf.get("model_type"), str):
        descriptor["family"] = hf["model_type"]
    architectures = hf.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        config["architecture"] = architectures[0]
    elif isinstance(manifest.metadata.get("architecture"), str):
        config["architecture"] = manifest.metadata["architecture"]
    body = {
        "descriptor": descriptor,
        "config": config,
        "modelfs": {"type": "layers", "diffIds": [layer.sha256 for layer in layers]},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _image_manifest(config: bytes, config_digest: str, layers: list[_Layer], name: str) -> bytes:
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": MODEL_ARTIFACT,
        "config": {"mediaType": MODEL_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [layer.descriptor() for layer in layers],
        "annotations": {"org.opencontainers.image.title": name},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _labels(layer: _Layer) -> list[str]:
    return [label if PART in layer.annotations else f"asset:{label}" for label in layer.labels]


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _image(manifest: Manifest, layers: list[_Layer]) -> tuple[bytes, bytes]:
    """The model config and the image manifest of ``layers`` (each with its SHA-256 set)."""
    config = _model_config(manifest, layers)
    return config, _image_manifest(config, sha256_of(config), layers, manifest.name)


def put_image(client: Registry, oci: OciRef, config: bytes, image: bytes) -> None:
    """Put the config blob (unless the repository has it), then the image under the reference's tag."""
    config_digest = sha256_of(config)
    if client.blob_size(oci.repository, config_digest) != len(config):
        client.upload_blob(oci.repository, config, config_digest, len(config))
    assert oci.tag is not None
    client.put_manifest(oci.repository, oci.tag, image, OCI_MANIFEST)


def image_of(manifest_bytes: bytes, oci: OciRef, blobs: Mapping[str, tuple[str, int]]) -> tuple[bytes, bytes]:
    """The config and image that publish ``manifest_bytes`` under ``oci``'s tag when the repository
    already holds every part and asset (``blobs``: file name -> ``(sha256 digest, size)``), with the
    manifest's own layer (the caller uploads it: its bytes are ``manifest_bytes``)."""
    assert oci.tag is not None
    manifest = decode_manifest(manifest_bytes, source=oci.url)
    layers = _layers(manifest, manifest_bytes, oci.tag, lambda blob: blob.file_name)
    for layer in layers:
        if isinstance(layer.source, bytes):
            layer.sha256 = sha256_of(layer.source)
            continue
        found = blobs.get(layer.source)
        if found is None or found[1] != layer.size:
            raise StoreError(
                f"{oci.url}: {', '.join(_labels(layer))} is not in the repository; upload its blob first "
                "(or publish the model with push)"
            )
        layer.sha256 = found[0]
    return _image(manifest, layers)


def refuse_another_model(client: Registry, oci: OciRef, name: str, *, force: bool) -> None:
    """Refuse to publish model ``name`` into a repository whose tags hold another model, unless
    ``force``: as with ``docker push``, a repository holds one model. A tag's model is the title
    of its image (a sepstore push sets it to the model's name); other images are not counted.

    Raises:
        StoreError: a tag holds another model. RegistryAuthError, RegistryError: the registry refused.
    """
    if force:
        return
    try:
        tags = [t for t in client.tags(oci.repository) if not re.fullmatch(r"sha256-[0-9a-f]{64}", t)]
    except NotFoundError:
        return  # no repository yet

    def model_of(tag: str) -> str | None:
        try:
            body = json_object(client.get_manifest(oci.repository, tag)[0], oci.with_tag(tag).url)
        except (NotFoundError, ManifestError):  # deleted since the listing, or not an image sepstore reads
            return None
        annotations = body.get("annotations")
        title = annotations.get(TITLE) if isinstance(annotations, dict) else None
        return title if body.get("artifactType") == MODEL_ARTIFACT and isinstance(title, str) else None

    with ThreadPoolExecutor(_WORKERS, "sepstore-oci-models") as pool:
        models = dict(zip(tags, pool.map(model_of, tags), strict=True))
    others = sorted((model, tag) for tag, model in models.items() if model is not None and model != name)
    if others:
        held, tag = others[0]
        raise StoreError(
            f"oci://{oci.host}/{oci.repository} holds model {held!r} (tag {tag!r}), not {name!r}: as with docker "
            "push, a repository holds one model; push it to a repository of its own, or pass force=True (CLI: --force) "
            "to add it to this one anyway"
        )


def held_digest(client: Registry, oci: OciRef) -> str | None:
    try:
        return client.get_manifest(oci.repository, oci.reference)[2]
    except NotFoundError:
        return None


# -- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OciModel:
    """A model version read from a registry: the sepstore manifest's bytes (checked against the
    layer's SHA-256 and the BLAKE3 the image promises), the image it came in, and where each of its
    part and asset files is (``blobs``: file name -> ``(sha256 digest, size)``)."""

    ref: OciRef
    registry: Registry = field(repr=False, compare=False)
    image_digest: str
    image: bytes = field(repr=False)
    data: bytes = field(repr=False)
    blobs: Mapping[str, tuple[str, int]] = field(repr=False)

    @property
    def url(self) -> str:
        return self.ref.url

    @property
    def subject(self) -> tuple[str, int]:
        """The image manifest's digest and size: what its referrers (signatures) name."""
        return self.image_digest, len(self.image)

    def resolved(self) -> Resolved:
        """The manifest as every reading function takes it (``load``, ``pull``, ``verify``, ``push`` ...),
        its parts read from the repository (:class:`~sepstore.stores.registry.RegistryStore`)."""
        from ..stores.registry import RegistryStore  # which imports this module

        return RegistryStore.holding(self).resolved(self)

    def fetch(self, blob: Blob, write: Callable[[bytes], None]) -> None:
        """Stream a part's or asset's whole blob into ``write``, checking its SHA-256 and its BLAKE3."""
        sha256, size = self.blobs[blob.file_name]
        if size != blob.size:
            raise IntegrityError(f"{self.url}: blob {sha256} is {size} bytes, the manifest says {blob.size}")
        hasher = Hasher()

        def both(piece: bytes) -> None:
            hasher.update(piece)
            write(piece)

        self.registry.download_blob(self.ref.repository, sha256, size, both)
        if digest_of(hasher) != blob.digest:
            raise IntegrityError(
                f"{self.url}: blob {sha256} has BLAKE3 digest {digest_of(hasher)}, the manifest says {blob.digest}"
            )


#: What ``storage_options`` may hold with an ``oci://`` reference.
REGISTRY_OPTIONS: Final = frozenset({"insecure", "username", "password"})


def registry_for(host: str, storage_options: Mapping[str, Any] | None) -> Registry:
    """A client of ``host`` configured by ``storage_options`` (``insecure``, and ``username`` with
    ``password`` instead of the environment's or the Docker config's credentials)."""
    options = dict(storage_options or {})
    unknown = sorted(set(options) - REGISTRY_OPTIONS)
    if unknown:
        raise RefError(
            f"storage_options {unknown} do not apply to an OCI registry; it takes {sorted(REGISTRY_OPTIONS)}"
        )
    username, password = options.get("username"), options.get("password")
    if (username is None) != (password is None) or not isinstance(username or "", str):
        raise RefError("storage_options: give both username and password (strings), or neither")
    credentials = Credentials(username, password, "storage_options") if username is not None else None
    return Registry(host, credentials=credentials, insecure=bool(options.get("insecure", False)))


def resolve_url(
    url: str,
    *,
    tag: str | None = None,
    parts_url: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Resolved:
    """What :func:`sepstore.resolve` does with an ``oci://HOST/REPOSITORY[:TAG]`` reference: the
    version it names (``tag`` fills in a tag the URL leaves out) as a :class:`Resolved` whose parts
    are read from the registry (or from the ``parts_url`` mirror), verified as any store's."""
    oci = OciRef.parse(url)
    if tag is not None and oci.tag is not None and tag != oci.tag:
        raise RefError(f"tag={tag!r} contradicts the reference's tag {oci.tag!r} ({url})")
    if tag is not None and oci.tag is None:
        oci = OciRef(oci.host, oci.repository, tag, oci.digest)
    from ..stores.registry import RegistryStore  # which imports this module

    store = RegistryStore(f"oci://{oci.host}/{oci.repository}", dict(storage_options or {}))
    model = store.model(oci)
    if parts_url is None:
        return store.resolved(model, storage_options)
    return Resolved(model.data, model.url, parts_url)


def json_object(image: bytes, url: str) -> dict[str, Any]:
    try:
        body = json.loads(image)
    except ValueError:
        raise ManifestError(f"{url}: the image manifest is not JSON") from None
    if not isinstance(body, dict):
        raise ManifestError(f"{url}: the image manifest is not a JSON object")
    return body


def layer_descriptors(body: dict[str, Any], url: str) -> list[dict[str, Any]]:
    layers = body.get("layers")
    if not isinstance(layers, list) or not all(
        isinstance(x, dict)
        and isinstance(x.get("digest"), str)
        and type(x.get("size")) is int
        and x["size"] >= 0
        and isinstance(x.get("annotations", {}), dict)
        for x in layers
    ):
        raise ManifestError(f"{url}: the image manifest's layers are not descriptors")
    return layers


def resolve_oci(ref: OciRef | str, *, registry: Registry | None = None) -> OciModel:
    """Read the model version ``ref`` names (``oci://HOST/REPOSITORY:TAG``, or ``@sha256:`` pinned):
    its image manifest, then the sepstore manifest layer, checked by SHA-256 and by the BLAKE3
    the image annotates it with; every part and asset of the manifest must be a layer of the
    image, of the size the manifest says.

    Raises:
        NotFoundError: no such tag or image. ManifestError: the image is not a sepstore model, or
            lacks a layer. IntegrityError: a layer's bytes differ from their digests.
    """
    oci = ref if isinstance(ref, OciRef) else OciRef.parse(ref)
    client = registry or Registry(oci.host)
    image, media, image_digest = client.get_manifest(oci.repository, oci.reference)
    url = oci.url
    body = json_object(image, url)
    if media not in ("", OCI_MANIFEST) or body.get("artifactType") != MODEL_ARTIFACT:
        raise ManifestError(
            f"{url}: not a model pushed by sepstore (media type {media or body.get('mediaType')!r}, artifact type "
            f"{body.get('artifactType')!r}; expected an image manifest of artifact type {MODEL_ARTIFACT})"
        )
    layers = layer_descriptors(body, url)
    own = [x for x in layers if MANIFEST in x.get("annotations", {})]
    if len(own) != 1:
        raise ManifestError(f"{url}: the image has {len(own)} sepstore manifest layers ({MANIFEST}), not one")
    layer = own[0]
    if layer["size"] > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{url}: the sepstore manifest layer is {layer['size']} bytes, over the limit")
    data = bytearray()
    client.download_blob(oci.repository, layer["digest"], layer["size"], data.extend, what="the manifest layer")
    promised = layer["annotations"][MANIFEST]
    if digest_buffer(data) != promised:
        raise IntegrityError(f"{url}: the manifest layer's BLAKE3 is {digest_buffer(data)}, the image says {promised}")
    manifest = decode_manifest(bytes(data), source=url)
    blobs: dict[str, tuple[str, int]] = {}
    for x in layers:
        digest = x.get("annotations", {}).get(DIGEST)
        if isinstance(digest, str) and _is_blake3(digest):
            blobs[_file_of(digest, x)] = (x["digest"], x["size"])
    for label, blob in [*manifest.labelled_parts(), *manifest.labelled_assets()]:
        found = blobs.get(blob.file_name)
        if found is None:
            raise ManifestError(f"{url}: {label} ({blob.digest}) is not a layer of the image")
        if found[1] != blob.size:
            raise IntegrityError(f"{url}: {label}'s layer is {found[1]} bytes, the manifest says {blob.size}")
    return OciModel(oci, client, image_digest, image, bytes(data), blobs)


def _is_blake3(digest: str) -> bool:
    return bool(re.fullmatch(r"blake3:[0-9a-f]{64}", digest))


def _file_of(digest: str, layer: dict[str, Any]) -> str:
    """A layer's file name in a store: ``<hex>.safetensors`` for a part, ``<hex>`` for an asset."""
    hex_ = digest.removeprefix("blake3:")
    return f"{hex_}.safetensors" if layer.get("mediaType") == WEIGHT_RAW else hex_


def tags_oci(ref: OciRef | str, *, registry: Registry | None = None) -> list[TagInfo]:
    """Every tag of the repository ``ref`` names (its tag, if any, is ignored), sorted, each read as
    :func:`sepstore.tags` reads a store's: an image that is not a sepstore model is listed with its
    ``error``. The tags of the referrers tag schema (``sha256-<hex>``) are left out."""
    oci = ref if isinstance(ref, OciRef) else OciRef.parse(ref)
    client = registry or Registry(oci.host)
    names = sorted(t for t in client.tags(oci.repository) if not re.fullmatch(r"sha256-[0-9a-f]{64}", t))

    def row(tag: str) -> TagInfo | None:
        at = oci.with_tag(tag)
        try:
            model = resolve_oci(at, registry=client)
        except NotFoundError:
            return None  # deleted since the listing
        except SepstoreError as exc:
            return TagInfo(oci.repository, tag, at.url, None, None, None, None, str(exc))
        manifest = decode_manifest(model.data, source=at.url)
        return TagInfo(
            manifest.name, tag, at.url, digest_buffer(model.data), manifest.n_layers, manifest.total_bytes, None
        )

    with ThreadPoolExecutor(_WORKERS, "sepstore-oci-tags") as pool:
        rows = list(pool.map(row, names))
    return [r for r in rows if r is not None]
