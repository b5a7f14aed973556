"""The Family type and the registry of built-in families."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..dump import Decider, Placement
from ..errors import DeciderError

__all__ = ["Family", "detect", "get", "prefix_decider", "register"]


@dataclass(frozen=True)
class Family:
    """A model family's checkpoint layout.

    ``decider`` places keys; ``layers`` is the dotted path of the layer ``ModuleList`` in the
    Hugging Face model (``model.layers``), so ``model.get_submodule(layers)[i]`` takes part
    ``mid[i]``; ``embed_key``/``head_key`` name the input embedding and LM head, for checkpoints
    that tie them and store only the embedding.
    """

    name: str
    decider: Decider
    model_types: tuple[str, ...] = ()
    layers: str = "model.layers"
    embed_key: str | None = None
    head_key: str | None = None
    ties_by_default: bool = False
    #: A key pattern only this family's checkpoints have, for detection without a config.
    signature: re.Pattern[str] | None = None
    architectures: tuple[str, ...] = field(default=())

    def tied_head(self, keys: Iterable[str], config: Mapping[str, Any] | None) -> dict[str, str]:
        """``{head_key: embed_key}`` when the config ties the embeddings and no head is stored."""
        keys = set(keys)
        tie = (config or {}).get("tie_word_embeddings", self.ties_by_default)
        if tie and self.head_key and self.embed_key and self.head_key not in keys and self.embed_key in keys:
            return {self.head_key: self.embed_key}
        return {}


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    _REGISTRY[family.name] = family
    return family


def _load_builtins() -> None:
    from . import llama  # noqa: F401


def get(name: str) -> Family:
    """The built-in family called ``name`` (``llama``, ``gpt2``, ...)."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DeciderError(f"no built-in decider {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def detect(keys: Iterable[str], config: Mapping[str, Any] | None = None) -> Family:
    """The family of a checkpoint: from its config's ``model_type``/``architectures``, else its keys.

    Every key must be placeable by the family's decider; if not, a :class:`DeciderError` lists the
    keys it could not place.
    """
    _load_builtins()
    keys = list(keys)
    config = config or {}
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    candidates = [f for f in _REGISTRY.values() if model_type in f.model_types]
    candidates += [f for f in _REGISTRY.values() if set(architectures) & set(f.architectures)]
    candidates += [f for f in _REGISTRY.values() if f.signature and any(f.signature.search(k) for k in keys)]
    for family in candidates:
        unplaced = [k for k in keys if not _placeable(family.decider, k)]
        if not unplaced:
            return family
    tried = ", ".join(dict.fromkeys(f.name for f in candidates)) or "none matched"
    raise DeciderError(
        f"cannot tell which decider places these keys (model_type {model_type!r}; tried: {tried}); "
        f"pass decider= one of {', '.join(sorted(_REGISTRY))} or a function. Keys: {_sample(keys)}"
    )


def _placeable(decider: Decider, key: str) -> bool:
    try:
        decider(key)
    except DeciderError:
        return False
    return True


def _sample(keys: list[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def prefix_decider(
    *,
    begin: Iterable[str],
    layers: str,
    end: Iterable[str],
    drop: str | None = None,
    strip: str = "",
) -> Callable[[str], Placement]:
    """A decider for the usual layout: keys under a ``begin`` prefix go to begin, ``<layers>.N.rest``
    to layer N (as ``rest``), keys under an ``end`` prefix to end; ``drop`` (a regex) drops keys
    such as rotary ``inv_freq`` buffers. ``strip`` is removed from begin/end names (``model.``).
    Anything else is a :class:`DeciderError` naming the key."""
    begin, end = tuple(begin), tuple(end)
    layer_re = re.compile(rf"^{re.escape(layers)}\.(\d+)\.(.+)$")
    drop_re = re.compile(drop) if drop else None

    def decide(key: str) -> Placement:
        if drop_re is not None and drop_re.search(key):
            return None
        match = layer_re.match(key)
        if match:
            return "mid", int(match[1]), match[2]
        short = key.removeprefix(strip) if strip else key
        if key.startswith(begin):
            return "begin", short
        if key.startswith(end):
            return "end", short
        raise DeciderError(f"key {key!r} is not in this family's begin ({begin}), layers ({layers}) or end ({end})")

    return decide
