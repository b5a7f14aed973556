"""Recognise a checkpoint at a path or URL and open its files as tensor sources, reading only
their indexes: an HF folder (sharded or single safetensors or ``.bin``, with ``config.json``), a
single ``.safetensors``/``.bin``/``.pth``/``.gguf`` file, an HF ``*.index.json``, or an
llm_sepweight directory. A GGUF of an architecture transformers reads as a llama-family model is
opened under Hugging Face names and layout (:mod:`sepstore.convert.gguf_hf`) unless ``gguf_names``."""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from ..assets import AssetInput
from ..backends import can_list, open_url
from ..dump import Decider
from ..errors import NotFoundError, StoreError
from ..store import backend_call, read_limited
from . import sepweight_v0
from .assets import find_assets
from .files import PickleFile, SafetensorsFile
from .source import TensorSource

__all__ = ["Checkpoint", "open_checkpoint"]

_PICKLE = (".bin", ".pth", ".pt")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")
#: How the names of checkpoint files end.
_FILES = (".json", ".safetensors", ".gguf", *_PICKLE)


@dataclass
class Checkpoint:
    """A checkpoint's files, opened lazily, with what is known about it."""

    url: str
    kind: str
    sources: Sequence[TensorSource]
    config: dict[str, Any] | None = None
    #: The format's own decider, where its names already say where keys go (llm_sepweight) ...
    decider: Decider | None = None
    decider_name: str | None = None
    #: ... or the built-in family its names always belong to (GGUF).
    family: str | None = None
    #: The Hugging Face model folder the checkpoint is (or whose index it is), where its assets are.
    folder: tuple[fsspec.AbstractFileSystem, str] | None = None
    #: The files a checkpoint holds inside itself (a GGUF's tokenizer), made when asked for.
    embedded_assets: Callable[[], Mapping[str, AssetInput]] | None = None

    def assets(self) -> Mapping[str, AssetInput]:
        """The model's non-weight files: its folder's (the allow-list of :mod:`.assets`), or those
        the checkpoint embeds."""
        if self.folder is not None:
            return find_assets(*self.folder)
        return self.embedded_assets() if self.embedded_assets is not None else {}

    def close(self) -> None:
        """Close the files the sources hold open."""
        for source in self.sources:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    @property
    def default_name(self) -> str:
        """A model name from the checkpoint's folder or file name."""
        base = posixpath.basename(self.url.rstrip("/"))
        for suffix in (".index.json", ".safetensors", ".gguf", *_PICKLE):
            base = base.removesuffix(suffix)
        if base in _INDEXES or base in ("model", "pytorch_model"):
            base = posixpath.basename(posixpath.dirname(self.url.rstrip("/")))
        return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip(".-") or "model"


def _open_file(fs: fsspec.AbstractFileSystem, path: str) -> TensorSource:
    url = fs.unstrip_protocol(path)
    if path.endswith(".safetensors"):
        return SafetensorsFile(fs, path, url)
    if path.endswith(_PICKLE):
        return PickleFile(fs, path, url)
    raise StoreError(
        f"{url}: not a checkpoint file sepstore reads (.safetensors, .bin, .pth, .pt; a .gguf file converts on its own)"
    )


def _gguf_checkpoint(fs: fsspec.AbstractFileSystem, path: str, url: str, gguf_names: bool) -> Checkpoint:
    """A GGUF under Hugging Face names (llama family) where transformers reads its architecture so,
    else under its own (the gguf family); its embedded tokenizer as assets either way."""
    from . import gguf_hf
    from .gguf import GGUFFile

    file = GGUFFile(fs, path, url)

    def tokenizer() -> dict[str, bytes]:
        return gguf_hf.tokenizer_files(file)

    if gguf_names or file.architecture not in gguf_hf.ARCHITECTURES:
        return Checkpoint(url, "gguf", [file], file.config, family="gguf", embedded_assets=tokenizer)
    try:
        view = gguf_hf.TransformersView(file)
    except BaseException:
        file.close()
        raise
    return Checkpoint(url, "gguf", [view], view.config, family="llama", embedded_assets=tokenizer)


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """A ``config.json`` or ``*.index.json`` (``None`` if there is none), no larger than a manifest may be."""
    url = fs.unstrip_protocol(path)
    if not backend_call(fs, url, lambda: fs.exists(path)):
        return None
    data = read_limited(fs, path, url, what="a checkpoint's JSON file")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise StoreError(f"{url}: not JSON ({type(exc).__name__}: {exc})") from None
    return value if isinstance(value, dict) else None


def _from_index(fs: fsspec.AbstractFileSystem, index_path: str) -> list[TensorSource]:
    index = _read_json(fs, index_path)
    weight_map = (index or {}).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise StoreError(f"{fs.unstrip_protocol(index_path)}: no weight_map")
    folder = posixpath.dirname(index_path)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not isinstance(shard, str) or "/" in shard or shard in (".", ".."):
            raise StoreError(f"{fs.unstrip_protocol(index_path)}: shard name {shard!r} is not a file beside it")
    return [_open_file(fs, f"{folder}/{shard}") for shard in shards]


def open_checkpoint(
    source: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *, gguf_names: bool = False
) -> Checkpoint:
    """Open the checkpoint at ``source`` (a path or any fsspec URL) without reading its tensors;
    ``gguf_names`` keeps a GGUF's own names and layout."""
    url = os.fspath(source)
    if url.startswith("oci://"):
        raise StoreError(
            f"{url}: an OCI registry holds sepstore models, not checkpoints to convert; load, pull or export it "
            "(sepstore export REF OUT_DIR gives a Hugging Face folder)"
        )
    fs, path = open_url(url, storage_options)
    path = path.rstrip("/") or path
    # a file named as one is asked about first: over HTTP, isdir reads the whole answer looking for links
    is_file = path.endswith(_FILES) and backend_call(fs, url, lambda: fs.isfile(path))
    if not is_file and not can_list(fs):
        raise StoreError(
            f"{url}: a folder over plain HTTP cannot be listed; give the URL of its "
            "model.safetensors.index.json (or of one weights file)"
        )
    is_dir = not is_file and backend_call(fs, url, lambda: fs.isdir(path))
    if not is_dir and not is_file and not backend_call(fs, url, lambda: fs.exists(path)):
        raise NotFoundError(f"{url}: no such checkpoint file or folder")
    if not is_dir:
        folder = posixpath.dirname(path)
        config = _read_json(fs, f"{folder}/config.json")
        if path.endswith(".index.json"):
            return Checkpoint(url, "hf-index", _from_index(fs, path), config, folder=(fs, folder))
        if path.endswith(".gguf"):
            return _gguf_checkpoint(fs, path, url, gguf_names)
        return Checkpoint(url, "file", [_open_file(fs, path)], config)
    names = {posixpath.basename(p.rstrip("/")) for p in backend_call(fs, url, lambda: fs.ls(path, detail=False))}
    config = _read_json(fs, f"{path}/config.json") if "config.json" in names else None
    for index in _INDEXES:
        if index in names:
            return Checkpoint(url, "hf-sharded", _from_index(fs, f"{path}/{index}"), config, folder=(fs, path))
    for single in _SINGLES:
        if single in names:
            return Checkpoint(url, "hf", [_open_file(fs, f"{path}/{single}")], config, folder=(fs, path))
    if sepweight_v0.is_sepweight_v0(names):
        parts = sepweight_v0.sources(fs, path, names)
        return Checkpoint(url, "llm_sepweight", parts, config, sepweight_v0.decider, "sepweight_v0")
    files = sorted(n for n in names if n.endswith((".safetensors", ".gguf", *_PICKLE)))
    if len(files) == 1 and files[0].endswith(".gguf"):
        return open_checkpoint(f"{url.rstrip('/')}/{files[0]}", storage_options, gguf_names=gguf_names)
    if files and not any(f.endswith(".gguf") for f in files):
        sources = [_open_file(fs, f"{path}/{f}") for f in files]
        return Checkpoint(url, "files", sources, config, folder=(fs, path))
    raise NotFoundError(
        f"{url}: no checkpoint found (looked for {', '.join(_INDEXES + _SINGLES)}, llm_sepweight begin/mid/end "
        f".pth files, or .safetensors/.bin/.pth/.gguf files); it holds: {', '.join(sorted(names)) or 'nothing'}"
    )
