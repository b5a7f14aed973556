"""convert: a checkpoint as found on a model hub into a sepweight store, streamed part by part.

The source's tensor index is read first; tensors are then read one part at a time and freed
before the next, so peak memory is about one part whatever the model's size.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..deciders import Family, detect, get
from ..dump import Decider, dump
from ..errors import TensorError
from ..manifest import Manifest
from .checkpoint import Checkpoint, open_checkpoint
from .source import LazyStateDict

__all__ = ["Checkpoint", "convert", "open_checkpoint", "parse_dtype"]

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "f16": torch.float16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "f32": torch.float32,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"fp16"``, ``"fp32"`` (or a floating torch dtype) to a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise TensorError(f"--dtype must be a floating-point type, got {dtype}")
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise TensorError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32") from None


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
    quiet: bool = False,
) -> Manifest:
    """Convert the checkpoint at ``source`` into the store at ``out_path`` as ``name``/``tag``.

    ``source`` is an HF model folder (sharded or single safetensors or ``.bin``), a single
    ``.safetensors``/``.bin``/``.pth``/``.gguf`` file, an HF ``*.index.json``, or an llm_sepweight
    directory, on local disk or any fsspec URL. ``decider`` is ``"auto"`` (from ``config.json``
    and the keys), a built-in family name (``"llama"``, ``"gpt2"``, ...) or a function.
    ``dtype`` casts floating-point tensors (``"bf16"``). ``name`` defaults to the folder's name.
    """
    checkpoint = open_checkpoint(source, storage_options)
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
    state = LazyStateDict(checkpoint.sources, aliases=aliases, dtype=parse_dtype(dtype))
    metadata = {
        "source": checkpoint.url,
        "source_format": checkpoint.kind,
        "decider": decider_name,
    }
    if dtype is not None:
        metadata["dtype"] = str(parse_dtype(dtype)).removeprefix("torch.")
    architectures = (checkpoint.config or {}).get("architectures")
    if isinstance(architectures, list) and architectures:
        metadata["architecture"] = str(architectures[0])
    return dump(
        chosen,
        state,
        out_path,
        name=name or checkpoint.default_name,
        tag=tag,
        config=checkpoint.config,
        metadata=metadata,
        storage_options=dest_storage_options,
        quiet=quiet,
    )
