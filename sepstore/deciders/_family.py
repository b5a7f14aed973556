"""The Family type, the registry of built-in families, detection and :func:`prefix_decider`."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..dump import Decider, Placement, place
from ..errors import DeciderError
from ..manifest import LayerRename, Rename, Renames

__all__ = [
    "REBUILT_BUFFERS",
    "Family",
    "PrefixDecider",
    "Runtime",
    "buffer_pattern",
    "detect",
    "families",
    "get",
    "prefix_decider",
    "register",
]

T = TypeVar("T")


#: Buffers any family's older checkpoints may hold and its model rebuilds, by the last part of their
#: name: rotary frequencies, position and token-type ids, the causal-mask ``masked_bias``.
REBUILT_BUFFERS = r"(?:original_)?inv_freq|position_ids|token_type_ids|masked_bias"


def buffer_pattern(*own: str) -> re.Pattern[str]:
    """The names of a family's rebuilt buffers: :data:`REBUILT_BUFFERS`, plus its ``own`` (patterns
    of a name's last dotted parts, e.g. ``attn\\.bias``)."""
    return re.compile(rf"(?:^|\.)(?:{'|'.join((REBUILT_BUFFERS, *own))})\Z")


_REBUILT = buffer_pattern()


@dataclass(frozen=True)
class Runtime:
    """What :mod:`sepstore.hf` needs to run slices of a family's transformers causal LM: the
    ``model_types`` checked to run bit-identically to the full model (others are refused), and
    whether the base model's layer loop takes ``outputs[0]`` of each layer (Falcon, BLOOM) rather
    than a tensor. Masks, positions and rotary embeddings come from the family's own forward."""

    model_types: tuple[str, ...]
    layer_returns_tuple: bool = False


@dataclass(frozen=True)
class Family:
    """A model family's checkpoint layout.

    ``decider`` places keys. ``layers`` is the dotted path of the layer ``ModuleList`` in the
    family's Hugging Face LM model (``model.layers`` in ``LlamaForCausalLM``, ``transformer.h``
    in ``GPT2LMHeadModel``), so ``model.get_submodule(layers)[i].load_state_dict(psd.mid[i])``
    works; ``base`` is the prefix that model puts before the base model's keys (``model.``), which
    checkpoints saved from the base model (``LlamaModel``) lack: the decider takes both, and in the
    base model the layers are at ``layers.removeprefix(base)``. ``embed_key``/``head_key`` name the
    input embedding and the LM head, for checkpoints that tie them and store only the embedding
    (``ties_by_default`` when the config does not say); ``head_with`` (a key prefix), when set, asks
    for the head only where the checkpoint has that head's other weights (an encoder saved without
    its masked-LM head gets none). ``aliases`` are tensors a model always shares under two names
    (``{alias: key}``, e.g. BERT's ``cls.predictions.decoder.bias``), added when only ``key`` is
    stored.

    ``buffers`` matches the names (as the checkpoint or a part spells them) of buffers that older
    checkpoints hold and the model rebuilds itself: rotary ``inv_freq``, causal-mask ``bias`` /
    ``masked_bias``, ``position_ids`` (:func:`buffer_pattern`; :data:`REBUILT_BUFFERS` by default).
    It is the one rule for them: :mod:`sepstore.hf` ignores them too. ``convert`` keeps them in the
    part they belong to, so that
    ``export`` gives back the checkpoint exactly; a loader may skip those its module lacks
    (:func:`sepstore.lazy_load` does, even with ``strict=True``, for a store ``convert`` made with
    this family; for ``module.load_state_dict`` leave them out with :meth:`skip_buffers`).
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
    architectures: tuple[str, ...] = ()
    base: str = ""
    head_with: str | None = None
    aliases: tuple[tuple[str, str], ...] = ()
    #: How sepstore.hf runs a slice of this family's model; None where it cannot.
    runtime: Runtime | None = None
    buffers: re.Pattern[str] | None = _REBUILT

    def is_buffer(self, name: str) -> bool:
        """Whether ``name`` (a checkpoint key, or a name in a part) is a buffer the model rebuilds."""
        return self.buffers is not None and self.buffers.search(name) is not None

    def skip_buffers(self, tensors: Mapping[str, T], wanted: Collection[str]) -> dict[str, T]:
        """``tensors`` less the buffers the model rebuilds that a module does not hold (its
        state-dict keys are ``wanted``): ``layer.load_state_dict(family.skip_buffers(part,
        layer.state_dict()), strict=True)``."""
        return {name: t for name, t in tensors.items() if name in wanted or not self.is_buffer(name)}

    def renames(self, keys: Collection[str], added: Iterable[str] = ()) -> Renames | None:
        """The manifest's record of how this family's decider renames the checkpoint ``keys`` (see
        :class:`~sepstore.manifest.Renames`), with ``added`` the keys ``convert`` adds
        (:meth:`tied_head`); checked to give back every key. ``None`` for a decider that is not a
        :class:`PrefixDecider`."""
        if not isinstance(self.decider, PrefixDecider):
            return None
        added = sorted(added)
        record = self.decider.renames(keys, added)
        for key in [*keys, *added]:
            placed = place(self.decider, key)
            if placed is None:
                continue
            slot, name = placed
            label = slot if isinstance(slot, str) else f"mid.{slot}"
            if record.original(label, name) != key:
                raise DeciderError(
                    f"{self.name}: the checkpoint spells its keys both with and without {self.decider.base!r} "
                    f"(e.g. {key!r}), so they cannot be named back on export; save it with one spelling, or "
                    "pass a decider function"
                )
        return record

    def tied_head(self, keys: Iterable[str], config: Mapping[str, Any] | None) -> dict[str, str]:
        """Tensors to add under a second name: ``{head_key: embed_key}`` when the config ties the
        word embeddings and no head is stored, plus the family's ``aliases`` whose target is stored.
        Both names are as the checkpoint spells them (with or without ``base``)."""
        keys = set(keys)
        out: dict[str, str] = {}
        tie = _config_value(config, "tie_word_embeddings", self.ties_by_default)
        if tie and self.head_key and self.embed_key:
            embed = self._stored(self.embed_key, keys)
            has_head = self._stored(self.head_key, keys) is not None
            wanted = self.head_with is None or any(k.startswith(self._prefixes(self.head_with)) for k in keys)
            if embed is not None and not has_head and wanted:
                out[self._spelled_like(self.head_key, embed)] = embed
        for alias, target in self.aliases:
            stored = self._stored(target, keys)
            if stored is not None and self._stored(alias, keys) is None:
                out[self._spelled_like(alias, stored)] = stored
        return out

    def _prefixes(self, key: str) -> tuple[str, ...]:
        if self.base and key.startswith(self.base):
            return key, key.removeprefix(self.base)
        return (key,)

    def _stored(self, key: str, keys: set[str]) -> str | None:
        """How the checkpoint spells ``key``: as given, or without ``base``; None if absent."""
        return next((k for k in self._prefixes(key) if k in keys), None)

    def _spelled_like(self, key: str, like: str) -> str:
        """``key`` without ``base`` if ``like`` (a stored key) lacks it, so one checkpoint's names
        stay of one kind."""
        if self.base and key.startswith(self.base) and not like.startswith(self.base):
            return key.removeprefix(self.base)
        return key


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the families :func:`get` and :func:`detect` know (replacing one of its name)."""
    _REGISTRY[family.name] = family
    return family


def _load_builtins() -> None:
    from . import (  # noqa: F401
        bert,
        bloom,
        falcon,
        gguf,
        gpt2,
        gpt_neox,
        llama,
        opt,
    )


def families() -> dict[str, Family]:
    """Every registered family, by name, built-ins first."""
    _load_builtins()
    return dict(_REGISTRY)


def get(name: str) -> Family:
    """The family called ``name`` (``llama``, ``gpt2``, ...), or the one a ``model_type`` such as
    ``mistral`` belongs to; else a :class:`DeciderError` naming the known ones."""
    _load_builtins()
    family = _REGISTRY.get(name)
    if family is None:
        family = next((f for f in _REGISTRY.values() if name in f.model_types), None)
    if family is None:
        raise DeciderError(f"no built-in decider {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return family


def detect(keys: Iterable[str], config: Mapping[str, Any] | None = None) -> Family:
    """The family of a checkpoint: from its config's ``model_type``/``architectures``, else its keys.

    Candidates are tried in that order (config first, then every family whose ``signature``
    matches a key); the first whose decider places every key wins. If none does, a
    :class:`DeciderError` lists the keys that could not be placed.
    """
    _load_builtins()
    keys = list(keys)
    model_type = _config_value(config, "model_type")
    architectures = _config_value(config, "architectures") or []
    if not isinstance(architectures, list | tuple):
        architectures = [architectures]
    candidates = [f for f in _REGISTRY.values() if model_type is not None and model_type in f.model_types]
    candidates += [f for f in _REGISTRY.values() if set(map(str, architectures)) & set(f.architectures)]
    candidates += [f for f in _REGISTRY.values() if f.signature and any(f.signature.search(k) for k in keys)]
    candidates = list(dict.fromkeys(candidates))
    unplaced: dict[str, list[str]] = {}
    for family in candidates:
        unplaced[family.name] = [k for k in keys if not _placeable(family.decider, k)]
        if not unplaced[family.name]:
            return family
    if unplaced:
        best = min(unplaced, key=lambda name: len(unplaced[name]))
        tried = ", ".join(unplaced)
        what = f"keys the closest family ({best}) cannot place: {_sample(unplaced[best])}"
    else:
        tried = "no family's key pattern matched"
        everywhere = [k for k in keys if not any(_placeable(f.decider, k) for f in _REGISTRY.values())]
        what = f"keys no built-in decider places: {_sample(everywhere or keys)}"
    raise DeciderError(
        f"cannot tell which decider places this checkpoint (model_type {model_type!r}; tried: {tried}); "
        f"pass decider= (--decider) one of {', '.join(sorted(_REGISTRY))} or a function. {what}"
    )


def _config_value(config: Mapping[str, Any] | None, key: str, default: Any = None) -> Any:
    """A value of an HF config, or of its ``text_config`` (multimodal configs nest the LM's)."""
    if not config:
        return default
    if key in config:
        return config[key]
    text = config.get("text_config")
    return text.get(key, default) if isinstance(text, Mapping) else default


def _placeable(decider: Decider, key: str) -> bool:
    try:
        decider(key)
    except DeciderError:
        return False
    return True


def _sample(keys: list[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


@dataclass(frozen=True)
class PrefixDecider:
    """A decider for the usual layout (see :func:`prefix_decider`), which can also say how it
    renames keys (:meth:`renames`)."""

    begin: tuple[str, ...]
    layers: str
    end: tuple[str, ...]
    strip: str = ""
    base: str = ""
    drop: re.Pattern[str] | None = None
    _layer_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "strip", self.strip or self.base)
        object.__setattr__(self, "_layer_re", re.compile(rf"^{re.escape(self.layers)}\.(\d+)\.(.+)\Z", re.DOTALL))

    def _place(self, key: str) -> Placement:
        match = self._layer_re.match(key)
        if match:
            return "mid", int(match[1]), match[2]
        short = key.removeprefix(self.strip)
        if key.startswith(self.begin):
            return "begin", short
        if key.startswith(self.end):
            return "end", short
        return None

    def __call__(self, key: str) -> Placement:
        if self.drop is not None and self.drop.search(key):
            return None
        where = self._place(key)
        if where is None and self.base and not key.startswith(self.base):
            where = self._place(self.base + key)
        if where is None:
            also = f" (with or without {self.base!r})" if self.base else ""
            raise DeciderError(
                f"key {key!r} is not in this family's begin ({', '.join(self.begin)}), layers ({self.layers}.N.*) "
                f"or end ({', '.join(self.end)}){also}"
            )
        return where

    def renames(self, keys: Collection[str], added: Iterable[str] = ()) -> Renames:
        """How this decider renames ``keys``: each prefix's stored form and the checkpoint's, spelled
        with ``base`` unless no key has it (a checkpoint saved from the base model)."""
        full = not self.base or any(key.startswith(self.base) for key in keys)

        def original(prefix: str) -> str:
            return prefix if full else prefix.removeprefix(self.base)

        def rules(prefixes: tuple[str, ...]) -> tuple[Rename, ...]:
            found = {Rename(p.removeprefix(self.strip), original(p)) for p in prefixes}
            return tuple(sorted(found, key=lambda r: (-len(r.stored), r.stored, r.original)))

        layer = LayerRename("", f"{original(self.layers)}.{{i}}.")
        return Renames(rules(self.begin), (layer,), rules(self.end), tuple(sorted(added)))


def prefix_decider(
    *,
    begin: Iterable[str],
    layers: str,
    end: Iterable[str],
    drop: str | None = None,
    strip: str = "",
    base: str = "",
) -> PrefixDecider:
    """A decider for the usual layout: keys under a ``begin`` prefix go to begin, ``<layers>.N.rest``
    to layer N (as ``rest``, so the part is the layer module's own state dict), keys under an
    ``end`` prefix to end; ``drop`` (a regex) drops keys (the built-in families drop nothing, so that
    :func:`sepstore.export` gives the checkpoint back: buffers go where their prefix says, see
    :attr:`Family.buffers`). ``strip`` is removed from begin/end names. ``base`` (``"model."``) is
    the base model's prefix: it is stripped like ``strip``, and a key without it (a checkpoint saved
    from the base model) is placed as if it had it, so both spellings give the same parts. Anything
    else is a :class:`DeciderError` naming the key."""
    return PrefixDecider(tuple(begin), layers, tuple(end), strip, base, re.compile(drop) if drop else None)
