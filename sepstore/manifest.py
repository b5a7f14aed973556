"""The manifest: msgspec types, strict decoding, canonical encoding, JSON Schema.

Decoding *is* validation: the types carry the patterns and bounds, and :func:`decode_manifest`
turns every failure into a :class:`~sepstore.errors.ManifestError` that names the field.
"""

from __future__ import annotations

import bisect
import inspect
import json
import re
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Final

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from .errors import ManifestError
from .hashing import DIGEST_PATTERN, END, digest_buffer, digest_hex
from .safetensors_io import ITEMSIZE, MAX_HEADER_BYTES, shape_problem

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_ASSETS",
    "MAX_ASSET_BYTES",
    "MAX_ASSET_PATH",
    "MAX_MANIFEST_BYTES",
    "Asset",
    "Blob",
    "LayerRename",
    "Manifest",
    "Part",
    "Rename",
    "Renames",
    "Tensor",
    "decode_manifest",
    "encode_manifest",
    "manifest_digest",
    "schema",
]

FORMAT: Final = "sepweight"
#: The newest format this sepstore reads and writes. Version 2 adds ``assets`` and ``renames``; a
#: manifest without either is still written as version 1, so its bytes (and digest) stay what they were.
FORMAT_VERSION: Final = 2
#: How reports (pull, push, verify) name an asset: this, then its path.
ASSET_LABEL: Final = "asset:"
#: The first format version that may hold ``assets`` and ``renames``.
ASSETS_VERSION: Final = 2
#: Manifests larger than this are refused before they are decoded.
MAX_MANIFEST_BYTES: Final = 64 * 1024 * 1024

_SEGMENT = r"(?!\.\.?(?:/|$))[A-Za-z0-9._-]+"
NAME_PATTERN: Final = rf"^{_SEGMENT}(?:/{_SEGMENT})*{END}"
TAG_PATTERN: Final = rf"^{_SEGMENT}{END}"
TENSOR_NAME_PATTERN: Final = rf"^(?!__metadata__$).+{END}"
MAX_TENSOR_NAME: Final = 4096

Digest = Annotated[str, Meta(pattern=DIGEST_PATTERN, description="blake3:<64 lowercase hex>")]
DTypeName = Annotated[str, Meta(pattern=rf"^[A-Z][A-Z0-9_]*{END}", description="safetensors dtype, e.g. BF16")]
TensorName = Annotated[str, Meta(pattern=TENSOR_NAME_PATTERN, max_length=MAX_TENSOR_NAME)]
ModelName = Annotated[str, Meta(pattern=NAME_PATTERN, max_length=512)]
Dimension = Annotated[int, Meta(ge=0, le=2**63 - 1)]

#: Bounds on a manifest's assets: how many, how long a path may be, and how large one file.
MAX_ASSETS: Final = 10_000
MAX_ASSET_BYTES: Final = 1024**3
MAX_ASSET_PATH: Final = 1024
# An asset path: '/'-separated segments, none empty, '.' or '..', without control characters,
# backslashes or ':' (a Windows drive or stream), so that joined to any folder it stays inside it.
_ASSET_SEGMENT = r"(?!\.\.?(?:/|$))[^/\\:\x00-\x1f\x7f-\x9f]+"
ASSET_PATH_PATTERN: Final = rf"^{_ASSET_SEGMENT}(?:/{_ASSET_SEGMENT})*{END}"
AssetPath = Annotated[
    str,
    Meta(
        pattern=ASSET_PATH_PATTERN,
        max_length=MAX_ASSET_PATH,
        description="relative path: '/'-separated segments, none empty, '.' or '..', no '\\', ':' or controls",
    ),
]


#: Bounds on a rename record: rules per section, names added, and the length of a prefix.
MAX_RENAMES: Final = 64
MAX_ADDED: Final = 64
MAX_PREFIX: Final = 256
# Prefixes of tensor names: the characters of the families' module paths (no '/', '\\', controls or
# braces), so a record can only ever produce plain dotted names.
_PREFIX_CHARS = r"[A-Za-z0-9_.-]*"
NamePrefix = Annotated[str, Meta(pattern=rf"^{_PREFIX_CHARS}{END}", max_length=MAX_PREFIX)]
LayerPrefix = Annotated[
    str,
    Meta(
        pattern=rf"^{_PREFIX_CHARS}\{{i\}}{_PREFIX_CHARS}{END}",
        max_length=MAX_PREFIX,
        description="a prefix holding '{i}' once, for the layer number",
    ),
]


def is_asset_path(path: object) -> bool:
    """Whether a manifest can hold ``path`` as an asset's path (see :data:`AssetPath`)."""
    return isinstance(path, str) and len(path) <= MAX_ASSET_PATH and bool(re.fullmatch(ASSET_PATH_PATTERN, path))


def is_tensor_name(name: object) -> bool:
    """Whether a manifest can hold ``name`` as a tensor's name (one line, not ``__metadata__``)."""
    return isinstance(name, str) and len(name) <= MAX_TENSOR_NAME and bool(re.fullmatch(TENSOR_NAME_PATTERN, name))


class Tensor(Struct, frozen=True, forbid_unknown_fields=True):
    """One tensor of a part: safetensors dtype, shape and BLAKE3 of its raw bytes."""

    dtype: DTypeName
    shape: tuple[Dimension, ...]
    digest: Digest

    def __post_init__(self) -> None:
        problem = shape_problem(self.shape)
        if problem is not None:  # msgspec reports it as a ValidationError at this tensor's path
            raise ValueError(f"shape {list(self.shape)!r:.200}: {problem}")


class Part(Struct, frozen=True, forbid_unknown_fields=True):
    """One part file: its digest and size, and the tensors it holds (sorted by name)."""

    digest: Digest
    size: Annotated[int, Meta(ge=8)]
    tensors: dict[TensorName, Tensor]

    @property
    def file_name(self) -> str:
        """The part's file name in a store's (or cache's) ``parts/blake3/`` folder."""
        return f"{digest_hex(self.digest)}.safetensors"


class Asset(Struct, frozen=True, forbid_unknown_fields=True):
    """One non-weight file of the model (tokenizer, configs, template, license): its digest and size.

    Asset files sit beside the part files, named by their bare digest (no suffix: an asset may be
    any kind of file)."""

    digest: Digest
    size: Annotated[int, Meta(ge=0, le=MAX_ASSET_BYTES)]

    @property
    def file_name(self) -> str:
        """The asset's file name in a store's (or cache's) ``parts/blake3/`` folder."""
        return digest_hex(self.digest)


#: A file in a store's blob folder: a part or an asset.
Blob = Part | Asset


class Rename(Struct, frozen=True, forbid_unknown_fields=True):
    """A name in a begin or end part that starts with ``stored`` was ``original`` + the rest in the checkpoint."""

    stored: NamePrefix
    original: NamePrefix


class LayerRename(Struct, frozen=True, forbid_unknown_fields=True):
    """A name in layer ``i``'s part that starts with ``stored`` was ``original`` (its ``{i}`` the
    layer number) + the rest in the checkpoint."""

    stored: NamePrefix
    original: LayerPrefix


class Renames(Struct, frozen=True, forbid_unknown_fields=True):
    """How ``convert`` renamed a checkpoint's keys, per family rather than per tensor.

    Each section lists prefix rewrites; the first whose ``stored`` prefix starts a part's tensor
    name gives that tensor's name in the checkpoint. ``added`` are the checkpoint names of tensors
    ``convert`` added that the checkpoint did not hold (a tied LM head, BERT's decoder bias), which
    ``export`` leaves out as ``save_pretrained`` does."""

    begin: Annotated[tuple[Rename, ...], Meta(max_length=MAX_RENAMES)] = ()
    mid: Annotated[tuple[LayerRename, ...], Meta(max_length=MAX_RENAMES)] = ()
    end: Annotated[tuple[Rename, ...], Meta(max_length=MAX_RENAMES)] = ()
    added: Annotated[tuple[TensorName, ...], Meta(max_length=MAX_ADDED)] = ()

    def original(self, label: str, name: str) -> str | None:
        """The checkpoint's name of tensor ``name`` of part ``label`` (``begin``, ``mid.<i>``,
        ``end``); ``None`` when no rule covers it."""
        section, _, layer = label.partition(".")
        rules: tuple[Rename | LayerRename, ...] = self.mid if section == "mid" else getattr(self, section, ())
        for rule in rules:
            if name.startswith(rule.stored):
                return rule.original.replace("{i}", layer) + name[len(rule.stored) :]
        return None


class Manifest(Struct, frozen=True, forbid_unknown_fields=True, tag_field="format", tag=FORMAT):
    """A published model version: begin, one part per layer, end, and the model's config.

    ``mid[i]`` is layer ``i``; it is ``None`` only while a multi-call ``dump`` has not yet been
    given that layer's tensors.

    Format version 2 adds two optional fields, left out of a version-1 manifest:

    - ``assets``: the model's other files (tokenizer, configs, templates, license) by relative path.
    - ``renames``: how ``convert`` renamed the checkpoint's keys, derived from the model family's
      layout (:meth:`sepstore.deciders.Family.renames`) and the spelling the checkpoint used (with
      or without the base model's prefix, e.g. ``model.``), so that ``export`` writes every tensor
      under its original name. For a Llama checkpoint saved from ``LlamaForCausalLM``::

          {"begin": [{"stored": "embed_tokens.", "original": "model.embed_tokens."},
                     {"stored": "rotary_emb.", "original": "model.rotary_emb."}],
           "mid": [{"stored": "", "original": "model.layers.{i}."}],
           "end": [{"stored": "final_layernorm.", "original": "model.final_layernorm."},
                   {"stored": "lm_head.", "original": "lm_head."},
                   {"stored": "score.", "original": "score."},
                   {"stored": "norm.", "original": "model.norm."}],
           "added": ["lm_head.weight"]}   # a tied head convert added (else [])

      Rules are tried in order (longest ``stored`` first), the first that starts the name wins.

      A store written by ``dump`` with a decider function has none.
    """

    format_version: Annotated[int, Meta(ge=1)]
    name: ModelName
    parts: Annotated[str, Meta(min_length=1, max_length=2048)]
    begin: Part | None
    mid: list[Part | None]
    end: Part | None
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = {}
    #: Format version 2: the model's other files by relative path (left out of a version-1 manifest).
    assets: Annotated[dict[AssetPath, Asset], Meta(max_length=MAX_ASSETS)] | UnsetType = UNSET
    #: Format version 2: how the checkpoint's keys were renamed (left out of a version-1 manifest).
    renames: Renames | UnsetType = UNSET

    @property
    def n_layers(self) -> int:
        return len(self.mid)

    def labelled_parts(self) -> Iterator[tuple[str, Part]]:
        """``("begin", part)``, ``("mid.<i>", part)`` ..., ``("end", part)`` for present parts."""
        if self.begin is not None:
            yield "begin", self.begin
        for i, part in enumerate(self.mid):
            if part is not None:
                yield f"mid.{i}", part
        if self.end is not None:
            yield "end", self.end

    @property
    def total_bytes(self) -> int:
        """Bytes of all distinct part files."""
        return sum({p.digest: p.size for _, p in self.labelled_parts()}.values())

    @property
    def asset_files(self) -> dict[str, Asset]:
        """The assets by path (none in a version-1 manifest)."""
        return {} if isinstance(self.assets, UnsetType) else dict(self.assets)

    def labelled_assets(self) -> Iterator[tuple[str, Asset]]:
        """``("asset:<path>", asset)`` for every asset, sorted by path."""
        for path, asset in sorted(self.asset_files.items()):
            yield f"{ASSET_LABEL}{path}", asset


#: The most bytes of JSON a manifest's free-form ``config`` and ``metadata`` may take. They decode
#: into Python objects of any shape, up to ~70x their size (a config of 22 million empty lists
#: took 1.6 GiB within the 64 MiB manifest limit); Hugging Face configs are a few KiB, the largest
#: (ImageNet-21k label maps) under 1 MiB.
MAX_CONFIG_BYTES: Final = 8 * 1024 * 1024
MAX_METADATA_BYTES: Final = 1024 * 1024


class _Envelope(Struct):
    """What is checked before a manifest is decoded whole: its format, and the raw sizes of its
    free-form fields (left as bytes here)."""

    format: Any = None
    format_version: Any = None
    config: msgspec.Raw = msgspec.Raw(b"null")
    metadata: msgspec.Raw = msgspec.Raw(b"{}")


def decode_manifest(data: bytes, *, source: str) -> Manifest:
    """Decode and validate manifest bytes; ``source`` (a URL) is named in every error."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    try:
        envelope = msgspec.json.decode(data, type=_Envelope)
    except msgspec.DecodeError as exc:
        raise ManifestError(f"{source}: not a JSON object ({exc})") from None
    except RecursionError:
        raise ManifestError(f"{source}: JSON nested too deeply") from None
    if envelope.format != FORMAT:
        raise ManifestError(
            f"{source}: field `format` is {envelope.format!r}, expected {FORMAT!r}: not a sepstore manifest"
        )
    for field, raw, limit in (
        ("config", envelope.config, MAX_CONFIG_BYTES),
        ("metadata", envelope.metadata, MAX_METADATA_BYTES),
    ):
        if len(raw) > limit:
            raise ManifestError(f"{source}: field `{field}` is {len(raw)} bytes of JSON, over the {limit} limit")
    version = envelope.format_version
    if type(version) is not int:
        raise ManifestError(f"{source}: field `format_version` must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{source}: field `format_version` is {version}, newer than the {FORMAT_VERSION} this "
            "sepstore reads; upgrade sepstore"
        )
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except msgspec.DecodeError as exc:
        raise ManifestError(f"{source}: {exc}") from None
    except RecursionError:
        raise ManifestError(f"{source}: JSON nested too deeply") from None
    _check_parts_location(manifest.parts, source)
    _check_assets(manifest, source)
    if not isinstance(manifest.renames, UnsetType) and manifest.format_version < ASSETS_VERSION:
        raise ManifestError(
            f"{source}: field `renames` needs `format_version` {ASSETS_VERSION} or later, the manifest says "
            f"{manifest.format_version}"
        )
    for label, part in manifest.labelled_parts():
        _check_size(part, f"{source}: part {label}")
    return manifest


def _check_parts_location(parts: str, source: str) -> None:
    if "\\" in parts or "\x00" in parts or "?" in parts or "#" in parts:
        raise ManifestError(f"{source}: field `parts` {parts!r} has a character not allowed in a location")


def format_version_for(assets: Mapping[str, Asset], renames: Renames | None = None) -> int:
    """The format version a writer gives a manifest: the oldest that holds what it holds, so that a
    model without assets or renames keeps the version-1 bytes (and digest) older sepstores wrote and read."""
    return ASSETS_VERSION if assets or renames is not None else 1


def _check_assets(manifest: Manifest, source: str) -> None:
    """Assets only from version 2 on, and paths that can all be files of one folder at once: none
    is also a folder of another (``a`` and ``a/b``), and no two differ only in case (they would
    overwrite each other on macOS and Windows)."""
    if isinstance(manifest.assets, UnsetType):
        return
    if manifest.format_version < ASSETS_VERSION:
        raise ManifestError(
            f"{source}: field `assets` needs `format_version` {ASSETS_VERSION} or later, the manifest says "
            f"{manifest.format_version}"
        )
    paths = sorted(manifest.assets)
    for path in paths:  # the paths below `path/` sort together, first at the bisection point
        below = bisect.bisect_left(paths, path + "/")
        if below < len(paths) and paths[below].startswith(path + "/"):
            raise ManifestError(f"{source}: field `assets` has {path!r} as a file and as a folder of another asset")
    seen: dict[str, str] = {}
    for path in paths:
        other = seen.setdefault(path.casefold(), path)
        if other != path:
            raise ManifestError(f"{source}: field `assets` has {other!r} and {path!r}, which differ only in case")


def _check_size(part: Part, where: str) -> None:
    """A part's size must be its tensors' bytes plus the 8-byte length and a header of at most
    ``MAX_HEADER_BYTES``, so that nothing downstream (a free-space check, a partial file, chunking)
    sees a size its tensor table does not account for. A dtype this sepstore does not know (a
    newer writer's) has an unknown size: such a part's size is only checked to hold the others."""
    data, unknown = 0, False
    for tensor in part.tensors.values():
        itemsize = ITEMSIZE.get(tensor.dtype)
        if itemsize is None:
            unknown = True
            continue
        data += _tensor_bytes(tensor.shape, itemsize, part.size)
        if data > part.size:
            break
    header = part.size - 8 - data
    if header < 0 or (header > MAX_HEADER_BYTES and not unknown):
        tensors = f"{data} bytes of tensors" if data <= part.size else "more bytes of tensors than that"
        raise ManifestError(
            f"{where}: field `size` is {part.size}, which does not fit {tensors} plus an 8-byte length and a "
            f"header of at most {MAX_HEADER_BYTES} bytes"
        )


def _tensor_bytes(shape: tuple[int, ...], itemsize: int, cap: int) -> int:
    """Bytes of a tensor, or ``cap + 1`` as soon as they exceed ``cap`` (a hostile shape costs no
    arithmetic on huge integers)."""
    if 0 in shape:
        return 0
    nbytes = itemsize
    for dim in shape:
        nbytes *= dim
        if nbytes > cap:
            return cap + 1
    return nbytes


def encode_manifest(manifest: Manifest) -> bytes:
    """Canonical bytes: fields in declared order, dict keys sorted, 2-space indent, final newline."""
    return msgspec.json.format(msgspec.json.encode(manifest, order="deterministic"), indent=2) + b"\n"


def manifest_digest(data: bytes) -> str:
    """The digest that identifies a published version: BLAKE3 of the manifest's bytes."""
    return digest_buffer(data)


def schema() -> dict[str, Any]:
    """The JSON Schema of the manifest format, generated from the types above.

    It is normalised so that it does not depend on how a msgspec release formats it: descriptions
    (the types' docstrings) are dedented with :func:`inspect.cleandoc` (msgspec 0.23 started to
    dedent them itself) and the alternatives of each ``anyOf`` are sorted (their order changed too).
    """
    return _normalised(msgspec.json.schema(Manifest))


def _normalised(node: Any) -> Any:
    if isinstance(node, list):
        return [_normalised(value) for value in node]
    if not isinstance(node, dict):
        return node
    out = {key: _normalised(value) for key, value in node.items()}
    if isinstance(out.get("description"), str):
        out["description"] = inspect.cleandoc(out["description"])
    if isinstance(out.get("anyOf"), list):
        out["anyOf"] = sorted(out["anyOf"], key=lambda alternative: json.dumps(alternative, sort_keys=True))
    return out
