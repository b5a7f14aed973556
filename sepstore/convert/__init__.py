"""convert: a checkpoint as found on a model hub into a sepweight store, streamed part by part.

The source's tensor index is read first; tensors are then read one part at a time and freed
before the next, so peak memory is about one part whatever the model's size.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from ..deciders import Family, detect, get
from ..dump import Decider, dump
from ..errors import TensorError
from ..manifest import Manifest
from .checkpoint import Checkpoint, open_checkpoint
from .source import LazyStateDict

if TYPE_CHECKING:
    import torch

__all__ = ["Checkpoint", "convert", "open_checkpoint", "parse_dtype"]

#: ``--dtype`` spellings -> safetensors dtype name.
_DTYPES = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "f16": "F16",
    "fp16": "F16",
    "float16": "F16",
    "f32": "F32",
    "fp32": "F32",
    "float32": "F32",
    "f64": "F64",
    "fp64": "F64",
    "float64": "F64",
}
#: How a dtype is named in a manifest's metadata (torch's names).
_LONG = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def parse_dtype(dtype: str | torch.dtype | None) -> str | None:
    """``"bf16"``, ``"fp16"``, ``"fp32"``, ``"fp64"`` (or such a torch dtype) to a safetensors dtype name."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = _DTYPES.get(dtype.lower())
    else:
        from ..tensors import dtype_name

        try:
            name = dtype_name(dtype)
        except TypeError:  # not a torch dtype, or one safetensors lacks
            name = None
    if name not in _LONG:
        raise TensorError(f"unknown dtype {dtype!r} for convert; use one of bf16, fp16, fp32, fp64")
    return name


def convert(
    source: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    decider: str | Decider = "auto",
    name: str | None = None,
    tag: str = "latest",
    dtype: str | torch.dtype | None = None,
    storage_options: dict[str, Any] | None = None,
    dest_storage_options: dict[str, Any] | None = None,
    assets: bool = True,
    gguf_names: bool = False,
    force: bool = False,
    quiet: bool = False,
) -> Manifest:
    """Convert the checkpoint at ``source`` into the store at ``out_path`` as ``name``/``tag``.

    ``source`` is an HF model folder (sharded or single safetensors or ``.bin``), a single
    ``.safetensors``/``.bin``/``.pth``/``.gguf`` file, an HF ``*.index.json``, or an llm_sepweight
    directory, on local disk or any fsspec URL. ``decider`` is ``"auto"`` (from ``config.json``
    and the keys), a built-in family name (``"llama"``, ``"gpt2"``, ...) or a function.
    ``dtype`` casts floating-point tensors (``"bf16"``). ``name`` defaults to the folder's name.
    Converting into a tag that exists combines with it (as :func:`sepstore.dump` does); ``force``
    replaces it (and lets a registry repository holding another model take this one too). From a
    Hugging Face folder (or its index), the folder's tokenizer, configs, chat templates, README and
    license are stored as the model's assets (the allow-list is in :mod:`sepstore.convert.assets`);
    ``assets=False`` leaves them out. With a built-in family, the manifest records how the keys were
    renamed (``renames``), so :func:`sepstore.export` gives the checkpoint back under its own names;
    nothing the checkpoint holds is dropped (buffers too).

    A llama or qwen2 GGUF converts under Hugging Face names and layout, Q/K un-permuted as
    transformers' GGUF loader does, with an HF ``config.json`` as the manifest's config: the same
    parts as converting the equivalent HF checkpoint (:mod:`sepstore.convert.gguf_hf`). Other GGUF
    architectures, and any GGUF with ``gguf_names=True``, keep llama.cpp's names and layout. The
    tokenizer a GGUF embeds is stored as transformers writes it (``tokenizer.json``,
    ``tokenizer_config.json``, ``generation_config.json``, ...; this needs transformers). The
    manifest's ``metadata["tensor_names"]`` says which names a GGUF's store has: ``transformers``
    or ``gguf``. ``decider="gguf"``, which places only GGUF names, implies ``gguf_names``.
    """
    dtype_name = parse_dtype(dtype)
    gguf_names = gguf_names or decider == "gguf"
    with contextlib.closing(open_checkpoint(source, storage_options, gguf_names=gguf_names)) as checkpoint:
        keys = [key for src in checkpoint.sources for key in src.index]
        family: Family | None = None
        if callable(decider):
            chosen, decider_name = decider, getattr(decider, "__qualname__", "custom")
        elif decider == "auto" and checkpoint.decider is not None:
            chosen, decider_name = checkpoint.decider, checkpoint.decider_name or "auto"
        elif decider == "auto" and checkpoint.family is not None:
            family = get(checkpoint.family)
            chosen, decider_name = family.decider, family.name
        else:
            family = detect(keys, checkpoint.config) if decider == "auto" else get(decider)
            chosen, decider_name = family.decider, family.name
        aliases = family.tied_head(keys, checkpoint.config) if family is not None else {}
        renames = family.renames(keys, aliases) if family is not None else None
        state = LazyStateDict(checkpoint.sources, aliases=aliases, dtype=dtype_name)
        metadata = {
            "source": checkpoint.url,
            "source_format": checkpoint.kind,
            "decider": decider_name,
        }
        if checkpoint.kind == "gguf":
            metadata["tensor_names"] = "gguf" if checkpoint.family == "gguf" else "transformers"
        if dtype_name is not None:
            metadata["dtype"] = _LONG[dtype_name]
        architectures = (checkpoint.config or {}).get("architectures")
        if isinstance(architectures, list) and architectures:
            metadata["architecture"] = str(architectures[0])
        return dump(
            chosen,
            state,
            out_path,
            name=name or checkpoint.default_name,
            tag=tag,
            config=_cast_config(checkpoint.config, dtype_name),
            metadata=metadata,
            assets=checkpoint.assets() if assets else None,
            renames=renames,
            storage_options=dest_storage_options,
            force=force,
            quiet=quiet,
        )


def _cast_config(config: dict[str, Any] | None, dtype_name: str | None) -> dict[str, Any] | None:
    """The config with the dtype ``convert`` cast the weights to, where it names one (``dtype``,
    transformers 5's name, or ``torch_dtype``; ``torch_dtype`` if neither), so that a model built
    from it, or an exported folder, loads in the stored dtype."""
    if config is None or dtype_name is None:
        return config
    keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["torch_dtype"]
    return {**config, **dict.fromkeys(keys, _LONG[dtype_name])}
