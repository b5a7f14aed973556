"""Which files of a Hugging Face model folder ``convert`` keeps as assets: an allow-list.

Kept, anywhere in the folder (``1_Pooling/config.json`` too): files ending in one of
:data:`KEPT_SUFFIXES` (tokenizer files, ``tokenizer_config.json``, ``special_tokens_map.json``,
``generation_config.json``, chat templates, ``vocab.txt``/``merges.txt``, SentencePiece and
tiktoken models, ``README.md``, sentence-transformers' ``modules.json``, custom code), and files
whose name starts with one of :data:`KEPT_NAMES` (``LICENSE``, ``NOTICE``, ...). Left out: weight
files of any format (not on the list), the top-level ``config.json`` (the manifest's ``config``
holds it) and weight indexes (``*.index.json``, which name the source's shard files), hidden files
and folders (``.git``, ``.gitattributes``, ``.cache``), and the folders of other runtimes'
exports or of the original checkpoint (:data:`SKIPPED_FOLDERS`). An allow-list, not a deny-list,
so a store never silently grows by an export it was not asked to hold; each kept file is at most
:data:`MAX_CONVERT_ASSET_BYTES`. A folder that cannot be listed (plain HTTP) is asked for the files
of :data:`WELL_KNOWN` by name instead.
"""

from __future__ import annotations

from typing import Final

import fsspec

from ..assets import AssetFile
from ..backends import can_list
from ..errors import StoreError
from ..manifest import MAX_ASSETS, is_asset_path
from ..store import backend_call

__all__ = [
    "KEPT_NAMES",
    "KEPT_SUFFIXES",
    "MAX_CONVERT_ASSET_BYTES",
    "SKIPPED_FOLDERS",
    "WELL_KNOWN",
    "find_assets",
]

KEPT_SUFFIXES: Final = (".json", ".jinja", ".txt", ".model", ".tiktoken", ".md", ".py", ".yaml", ".yml")
KEPT_NAMES: Final = ("LICENSE", "LICENCE", "NOTICE", "COPYING", "USE_POLICY")
SKIPPED_FOLDERS: Final = frozenset({"onnx", "openvino", "coreml", "tflite", "original", "runs"})
#: A file on the list larger than this stops the conversion (``assets=False`` leaves them all out).
MAX_CONVERT_ASSET_BYTES: Final = 256 * 1024 * 1024
#: How deep below the model folder files are looked for.
_MAX_DEPTH = 4
#: The files asked for by name where a folder cannot be listed (a model folder on plain HTTP).
WELL_KNOWN: Final = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "preprocessor_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "README.md",
    "LICENSE",
)


def _kept(relative: str) -> bool:
    segments = relative.split("/")
    if any(s.startswith(".") for s in segments) or (len(segments) > 1 and segments[0] in SKIPPED_FOLDERS):
        return False
    base = segments[-1]
    if relative == "config.json" or base.endswith(".index.json"):
        return False
    return base.endswith(KEPT_SUFFIXES) or base.upper().startswith(KEPT_NAMES)


def find_assets(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, AssetFile]:
    """The files of the model folder ``folder`` that the allow-list keeps, by relative path."""
    url = fs.unstrip_protocol(folder)
    root = folder.rstrip("/") + "/"
    found = backend_call(
        fs, url, lambda: fs.find(folder, maxdepth=_MAX_DEPTH, detail=True) if can_list(fs) else _named(fs, root)
    )
    out: dict[str, AssetFile] = {}
    for path, info in sorted(found.items()):
        if info.get("type") == "directory" or not path.startswith(root):
            continue
        relative = path[len(root) :]
        if not _kept(relative):
            continue
        where = fs.unstrip_protocol(path)
        if not is_asset_path(relative):
            raise StoreError(
                f"{where}: its path {relative!r} cannot be an asset's (no '\\', ':' or control characters); "
                "rename it, or convert without assets (assets=False, --no-assets)"
            )
        size = int(info.get("size") or 0)
        if size > MAX_CONVERT_ASSET_BYTES:
            raise StoreError(
                f"{where} is {size} bytes, over the {MAX_CONVERT_ASSET_BYTES} bytes convert takes as an asset; "
                "convert without assets (assets=False, --no-assets) and add the files you want with dump(assets=...)"
            )
        out[relative] = AssetFile(fs, path, where, size)
    if len(out) > MAX_ASSETS:
        raise StoreError(
            f"{url}: {len(out)} asset files, over the {MAX_ASSETS} a manifest holds; convert with --no-assets"
        )
    return out


def _named(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict[str, object]]:
    """The files of :data:`WELL_KNOWN` that ``root`` holds, as :meth:`fsspec.AbstractFileSystem.find`
    describes them (a missing one is skipped)."""
    found: dict[str, dict[str, object]] = {}
    for name in WELL_KNOWN:
        try:
            found[root + name] = fs.info(root + name)
        except FileNotFoundError:
            continue
    return found
