"""Run a slice of a transformers model: only the layers a node loads are ever allocated.

:func:`load_model` builds the model the manifest's ``config`` describes on the meta device (no
memory), loads the spec's verified parts into it through transformers' own loading code (so its
renames and fusions apply, as in ``from_pretrained``), and leaves every other module on meta,
replaced by a stand-in that passes hidden states through. :class:`NodeModel` then calls the
family's own forward, so masks, positions and rotary embeddings are built exactly as the full
model builds them, and the outputs are bit-identical to the full model's.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .deciders import Family, get
from .errors import DeciderError, ManifestError, ModuleMismatchError, SpecError, UnsupportedModelError
from .load import iter_parts
from .manifest import Manifest
from .refs import FETCH_OPTIONS, RefLike, RefOptions, open_ref
from .spec import PartSpec, select_parts
from .tensors import DTYPES

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel
    from typing_extensions import Unpack

__all__ = [
    "NodeModel",
    "NodeOutput",
    "UnsupportedModelError",
    "greedy",
    "load_model",
    "prompt_positions",
    "quiet_loading",
    "supported_model_types",
]


@dataclass
class NodeOutput:
    """What a node's forward returns: ``logits`` on the node holding ``end``, else ``hidden_states``;
    ``past_key_values`` is the node's own cache (``None`` without ``use_cache``)."""

    hidden_states: torch.Tensor | None
    logits: torch.Tensor | None
    past_key_values: Cache | None


def _transformers() -> Any:
    """transformers, with the loader :func:`load_model` uses (transformers 5's)."""
    try:
        import transformers
    except ImportError:
        raise UnsupportedModelError(
            "sepstore.hf runs models with transformers, which is not installed: pip install 'sepstore[hf]'"
        ) from None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: F401
        from transformers.core_model_loading import convert_and_load_state_dict_in_model  # noqa: F401
        from transformers.modeling_utils import LoadStateDictConfig  # noqa: F401
    except ImportError:
        raise UnsupportedModelError(
            f"sepstore.hf needs transformers 5's weight loader, which transformers {transformers.__version__} "
            "lacks: pip install 'sepstore[hf]' (transformers>=5)"
        ) from None
    return transformers


def _family_of(manifest: Manifest) -> tuple[Family, dict[str, Any]]:
    """The manifest's family and config, refusing what cannot run."""
    if manifest.metadata.get("tensor_names") == "gguf" or manifest.metadata.get("decider") == "gguf":
        raise UnsupportedModelError(
            f"model {manifest.name!r} keeps llama.cpp's tensor names (converted with --gguf-names), which "
            "sepstore.hf cannot run; convert the GGUF again without --gguf-names (gguf_names=False) for a "
            "store with Hugging Face names that it runs"
        )
    config = manifest.config
    if not config or "model_type" not in config:
        raise UnsupportedModelError(
            f"model {manifest.name!r} has no transformers config (model_type) in its manifest; "
            "convert it from a Hugging Face folder with config.json to run it with sepstore.hf"
        )
    model_type = str(config["model_type"])
    family = _known_family(manifest.metadata.get("decider"), model_type)
    runtime = family.runtime if family is not None else None
    if family is None or runtime is None or model_type not in runtime.model_types:
        raise UnsupportedModelError(
            f"model {manifest.name!r} is a {model_type!r} model, which sepstore.hf cannot run as slices; "
            f"it runs {', '.join(supported_model_types())}"
        )
    return family, dict(config)


def _known_family(*names: str | None) -> Family | None:
    """The first of ``names`` (the decider convert recorded, the model type) that is a family."""
    for name in names:
        if name:
            try:
                return get(name)
            except DeciderError:
                continue
    return None


def supported_model_types() -> list[str]:
    """Every ``model_type`` :func:`load_model` runs."""
    from .deciders import families

    return sorted(t for f in families().values() if f.runtime is not None for t in f.runtime.model_types)


class _Zeros(nn.Module):
    """Stands in for an additive position embedding on a node without ``begin``: the hidden states
    it is given already hold it, so it adds zeros (``x + 0`` is ``x``, bit for bit)."""

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim, self.dtype = dim, dtype

    def forward(self, *args: Any, position_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        ids = position_ids if position_ids is not None else args[0]
        return torch.zeros((*ids.shape, self.dim), dtype=self.dtype, device=ids.device)


class _Skip(nn.Module):
    """Stands in for a layer another node runs: returns the hidden states as the layer would."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if self.as_tuple else hidden_states


@functools.cache
def _stage_cache_class() -> type:
    """A ``DynamicCache`` for a node holding some layers: length and mask-size questions about a
    layer it does not hold are answered by a held layer of the same kind (full or sliding), so the
    family's forward builds positions and masks as the full model's cache would."""
    transformers = _transformers()

    class StageCache(transformers.DynamicCache):  # type: ignore[misc,name-defined]
        def __init__(self, config: Any, held: Sequence[int]) -> None:
            super().__init__(config=config)
            self.held = list(held)

        def _held(self, layer_idx: int) -> int:
            if not self.held or layer_idx in self.held or layer_idx >= len(self.layers):
                return layer_idx
            sliding = self.is_sliding
            same = [i for i in self.held if i < len(sliding) and sliding[i] == sliding[layer_idx]]
            return (same or self.held)[0]

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return super().get_seq_length(self._held(layer_idx))

        def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
            return super().get_mask_sizes(query_length, self._held(layer_idx))

        def get_query_offset(self, layer_idx: int = 0) -> int:
            return super().get_query_offset(self._held(layer_idx))

    return StageCache


class NodeModel(nn.Module):
    """A transformers causal LM of which only some parts are materialised: ``begin`` (embeddings),
    some layers, ``end`` (final norm and LM head). Built by :func:`load_model`.

    ``forward`` takes ``input_ids`` on the node holding ``begin``, else ``hidden_states`` (what the
    previous node returned), and returns a :class:`NodeOutput`. ``attention_mask`` and
    ``position_ids`` are those of the full model's forward; with ``use_cache`` the node keeps its
    layers' keys and values in ``past_key_values`` (made by :meth:`new_cache` when not given).
    """

    def __init__(self, model: PreTrainedModel, family: Family, spec: PartSpec) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.spec = spec
        self.has_begin, self.has_end = spec.begin, spec.end
        self.layers = tuple(spec.layers)
        self._runner = model if spec.end else model.base_model
        self._params = set(inspect.signature(self._runner.forward).parameters)
        self._cache_key = "cache" if "cache" in self._params else "past_key_values"

    @property
    def config(self) -> Any:
        return self.model.config

    def new_cache(self) -> Cache:
        """An empty cache for this node's layers."""
        return _stage_cache_class()(self.model.config, self.layers)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
    ) -> NodeOutput:
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": use_cache}
        if self.has_begin:
            if input_ids is None or hidden_states is not None:
                raise SpecError(f"node {str(self.spec)!r} holds begin: give it input_ids, not hidden_states")
            kwargs["input_ids"] = input_ids
        else:
            if hidden_states is None or input_ids is not None:
                raise SpecError(
                    f"node {str(self.spec)!r} does not hold begin: give it hidden_states (the previous node's "
                    "output), not input_ids"
                )
            kwargs["inputs_embeds"] = hidden_states
        if position_ids is not None and "position_ids" in self._params:
            kwargs["position_ids"] = position_ids
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        if past_key_values is not None:
            kwargs[self._cache_key] = past_key_values
        with torch.no_grad():
            out = self._runner(**kwargs)
        cache = past_key_values if use_cache else None
        if self.has_end:
            return NodeOutput(None, out.logits, cache)
        return NodeOutput(out.last_hidden_state, None, cache)


def load_model(
    ref: RefLike,
    spec: str = "f",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
    **options: Unpack[RefOptions],
) -> NodeModel:
    """Build the transformers model at ``ref`` with only the parts ``spec`` names, every byte verified.

    ``ref`` and the options are as for :func:`sepstore.load`. The model is built from the
    manifest's ``config`` on the meta device; each part is read, verified and loaded on
    ``device`` in turn (in ``dtype``, default the stored one), and nothing else is allocated.

    Raises:
        UnsupportedModelError: transformers is missing, or the family cannot run as slices.
        ManifestError: the manifest's config is not one transformers builds, or its layer count is
            not the manifest's.
        TensorError: ``device`` is not one this torch can load onto.
        ModuleMismatchError: a part lacks a weight its modules need, or holds one they lack.
    """
    transformers = _transformers()
    resolved = open_ref("load_model", ref, options, FETCH_OPTIONS)
    manifest = resolved.manifest
    family, config = _family_of(manifest)
    parsed, _ = select_parts(manifest, spec)
    dtype = dtype or _stored_dtype(manifest)
    model = _meta_model(transformers, manifest, config, dtype)
    owners = _owners(model, family)
    chosen = iter_parts(resolved, parsed, verify=verify, device=device, cache_dir=options.get("cache_dir"))
    with quiet_loading(transformers):
        for label, tensors in chosen:  # iter_parts refuses an unknown device (TensorError) first
            _load_part(model, family, label, tensors, dtype)
    target = torch.device(device)
    _stand_in(model, family, parsed, owners)
    _finish(model, target)
    return NodeModel(model, family, parsed)


#: Config fields (under transformers' own names) that must be positive integers where given.
_COUNTS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size")


def _meta_model(transformers: Any, manifest: Manifest, config: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    """The model ``config`` describes, built on the meta device once its sizes are integers and its
    layer count is the manifest's: a larger count would run the missing layers as pass-throughs
    (and build each of them first), a smaller one would refuse the parts."""
    model_type = str(config["model_type"])
    aliases = getattr(transformers.CONFIG_MAPPING[model_type], "attribute_map", {})
    for name in _COUNTS:
        key = aliases.get(name, name)
        value = config.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise ManifestError(f"model {manifest.name!r}: its config's {key} is {value!r}, not a positive integer")
    try:
        hf_config = transformers.AutoConfig.for_model(**config)
    except Exception as exc:  # transformers' validation: any field, any exception type
        raise ManifestError(
            f"model {manifest.name!r}: its config is not a valid {model_type!r} config ({type(exc).__name__}: {exc})"
        ) from exc
    layers = getattr(hf_config, "num_hidden_layers", None)
    if type(layers) is not int or layers != len(manifest.mid):
        raise ManifestError(
            f"model {manifest.name!r}: its config's {aliases.get('num_hidden_layers', 'num_hidden_layers')} is "
            f"{layers!r} but the manifest has {len(manifest.mid)} layers; its config does not describe its parts"
        )
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except Exception as exc:
        raise ManifestError(
            f"model {manifest.name!r}: transformers cannot build a {model_type!r} model from its config "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return model.eval()


def _stored_dtype(manifest: Manifest) -> torch.dtype:
    """The dtype the parts store the model's floating-point weights in (the first one found)."""
    for _, part in manifest.labelled_parts():
        for tensor in part.tensors.values():
            dtype = DTYPES.get(tensor.dtype)
            if dtype is not None and dtype.is_floating_point:
                return dtype
    return torch.float32


def _owners(model: nn.Module, family: Family) -> dict[str, str]:
    """``{module path: "begin" | "end"}`` for the modules outside the layers that hold weights,
    placed by the family's decider (which takes the in-memory names too)."""
    owners: dict[str, str] = {}
    for key in model.state_dict(keep_vars=True):
        placed = family.decider(key)
        if placed is not None and placed[0] in ("begin", "end"):
            owners[key.rpartition(".")[0]] = placed[0]
    return owners


@contextmanager
def quiet_loading(transformers: Any) -> Iterator[None]:
    """Without transformers' per-part "Loading weights" bar (sepstore's own fetch bar stays)."""
    logging = transformers.utils.logging
    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _load_part(
    model: PreTrainedModel, family: Family, label: str, tensors: dict[str, torch.Tensor], dtype: Any
) -> None:
    """Load one verified part into the meta model through transformers' loader (its renames, such
    as GPT-NeoX's ``embed_out``, and fusions, such as Mixtral's experts). Buffers a part keeps that
    the model rebuilds (rotary ``inv_freq``, causal masks) are ignored; an extra weight is refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    known = set(model.state_dict(keep_vars=True))
    if label.startswith("mid."):
        prefix = f"{family.layers}.{label.partition('.')[2]}."
        named = {prefix + key: value for key, value in tensors.items()}
    else:
        named = {(family.base + key if family.base + key in known else key): v for key, v in tensors.items()}
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    config = LoadStateDictConfig(
        device_map={"": device}, dtype=dtype, weight_mapping=get_model_conversion_mapping(model)
    )
    info, _ = convert_and_load_state_dict_in_model(model, named, config)
    buffers = {name for name, _ in model.named_buffers()}
    extra = sorted(k for k in info.unexpected_keys if k not in buffers and not _is_buffer(family, k, named.get(k)))
    if extra:
        raise ModuleMismatchError(f"part {label} has weights the {family.name} model lacks: {extra[:10]}")
    if info.mismatched_keys:
        shown = [f"{k}: part {tuple(got)}, model {tuple(want)}" for k, got, want in sorted(info.mismatched_keys)]
        raise ModuleMismatchError(f"part {label} does not fit the model's shapes: {shown[:10]}")


def _is_buffer(family: Family, key: str, tensor: torch.Tensor | None) -> bool:
    """Whether a tensor a part holds and the model lacks is a buffer the model rebuilds itself,
    not a weight: the family names it so (:attr:`Family.buffers`), its decider drops it, or it is
    not floating point (a causal mask stored under a plain ``bias``)."""
    if tensor is not None and not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    return family.is_buffer(key) or family.decider(key) is None


def _finish(model: PreTrainedModel, device: torch.device) -> None:
    """Once the stand-ins are in, every weight left must have come from a part; buffers nobody
    stores (rotary ``inv_freq``, Gemma's embedding scale) are allocated and computed as
    ``from_pretrained`` computes them (loaded weights are marked initialised, so kept)."""
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModuleMismatchError(f"no part provided these weights: {missing[:10]}")
    for module in model.modules():
        metas = [name for name, b in module.named_buffers(recurse=False) if b.is_meta]
        for name in metas:
            module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
        if metas:
            model._init_weights(module)


def _stand_in(model: PreTrainedModel, family: Family, spec: PartSpec, owners: dict[str, str]) -> None:
    """Replace what this node does not run: layers by pass-through stand-ins, ``begin`` modules by
    zeros (an added position embedding) or the identity, ``end`` modules by the identity."""
    assert family.runtime is not None
    layers = model.get_submodule(family.layers)
    held = set(spec.layers)
    for i in range(len(layers)):
        if i not in held:
            layers[i] = _Skip(family.runtime.layer_returns_tuple)
    for path, slot in owners.items():
        if (slot == "begin" and spec.begin) or (slot == "end" and spec.end):
            continue
        module = model.get_submodule(path)
        if isinstance(module, nn.Embedding):
            stand_in: nn.Module = _Zeros(module.embedding_dim, module.weight.dtype)
        else:
            stand_in = nn.Identity()
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, stand_in)


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a (left-padded) prompt, as ``generate`` makes them."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def greedy(
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 8,
) -> torch.Tensor:
    """Greedy decoding as ``generate(do_sample=False)`` does it, over any pipeline of nodes.

    ``step(new_ids, attention_mask, position_ids)`` runs the new tokens through every stage (each
    keeping its own cache) and returns the last position's logits; the result is the new tokens.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = prompt_positions(attention_mask)
    new_ids, out = input_ids, []
    for _ in range(max_new_tokens):
        logits = step(new_ids, attention_mask, positions)
        token = logits.float().argmax(-1, keepdim=True)
        out.append(token)
        new_ids = token
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=-1)
        positions = positions[:, -1:] + 1
    return torch.cat(out, dim=-1)
